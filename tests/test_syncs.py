"""Device-to-host reads in the per-step path, counted.

A read of a device value on the host (``.item()``, ``bool(tensor)``, ``torch.equal``,
``.tolist()``) waits for every kernel queued before it: on a GPU each one stalls the
step. Every denoiser evaluation of a whole generation runs here under a dispatch mode
that sees the tensor operations behind those reads and counts the ones made while
LoRAtorio's code is on the stack; the one read a step needs (which branches gave finite
predictions, :func:`loratorio.engine.host_flags`) is counted by wrapping it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import loratorio
from loratorio import engine
from loratorio.settings import Settings

_PACKAGE = str(Path(loratorio.__file__).parent)
# operations that bring a device value to the host (bool() and item() end in _local_scalar_dense)
_READS = {"aten::_local_scalar_dense", "aten::equal", "aten::is_nonzero", "aten::item"}


class ReadCounter(TorchDispatchMode):
    """Counts host reads made while a frame of the ``loratorio`` package is on the Python stack."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in _READS or (func._schema.name == "aten::_to_copy" and _to_host(args, kwargs)):
            where = _our_frame()
            if where is not None:
                self.reads.append(f"{func._schema.name} at {where}")
        return func(*args, **(kwargs or {}))


def _to_host(args, kwargs) -> bool:
    device = (kwargs or {}).get("device")
    source = args[0] if args else None
    return (device is not None and torch.device(device).type == "cpu" and isinstance(source, torch.Tensor)
            and source.device.type != "cpu")


def _our_frame() -> str | None:
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.startswith(_PACKAGE):
            return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno}"
        frame = frame.f_back
    return None


def _count_during(monkeypatch, denoiser_class):
    """Run every ``denoiser_class.forward`` under a :class:`ReadCounter`; count ``host_flags`` calls too."""
    counter = ReadCounter()
    counts = {"evaluations": 0, "flag_reads": 0}
    forward = denoiser_class.forward

    def counted_forward(self, *args, **kwargs):
        counts["evaluations"] += 1
        with counter:
            return forward(self, *args, **kwargs)

    flags = engine.host_flags

    def counted_flags(tensor):
        counts["flag_reads"] += 1
        return flags(tensor)

    monkeypatch.setattr(denoiser_class, "forward", counted_forward)
    monkeypatch.setattr(engine, "host_flags", counted_flags)
    return counter, counts


def test_the_counter_sees_the_reads_it_must_count():
    counter = ReadCounter()
    t = torch.ones(3)
    with counter:
        engine.Composer._finite(t, None, t[None], None, [])  # a loratorio frame on the stack
        bool(t.sum() > 0)  # not ours: no loratorio frame
    assert counter.reads == []  # host_flags reads with tolist(), which a CPU tensor serves without dispatch
    with counter:
        exec(compile("bool(t.sum() > 0); t.sum().item(); torch.equal(t, t)", _PACKAGE + "/probe.py", "exec"),
             {"t": t, "torch": torch})
    assert len(counter.reads) == 3, counter.reads


@pytest.mark.parametrize("settings", [{}, {"composition_map": True}, {"top_k": 1}])
def test_a1111_steps_read_nothing_but_the_finite_flags(monkeypatch, tmp_path, settings):
    from tests import fake_a1111 as fa
    from tests.fake_a1111.model import TinySD
    from tests.lora_files import write_lora
    from tests.test_a1111 import lora_layers

    model = TinySD()
    unet, te = lora_layers(model)
    write_lora(tmp_path / "style.safetensors", {**unet, **te}, rank=4, seed=11)
    write_lora(tmp_path / "char.safetensors", unet, rank=2, seed=22)
    fake = fa.install(monkeypatch, model=model, lora_dir=tmp_path)
    _, runner = fa.load_script(fake)
    counter, counts = _count_during(monkeypatch, fake.sd_samplers_cfg_denoiser.CFGDenoiser)
    p = fa.make_p(fake, runner, Settings(enabled=True, **settings).to_args(), prompt="a cat <lora:style> <lora:char>",
                  negative_prompt="blurry", steps=4, batch_size=2)
    fake.processing.process_images(p)
    assert not fake.errors.reported, fake.errors.reported
    assert counts["evaluations"] == 4
    assert counter.reads == []
    assert counts["flag_reads"] == counts["evaluations"]  # one read per composed step, none per branch


def test_forge_steps_read_nothing_but_the_finite_flags(monkeypatch, tmp_path):
    from fake_forge.harness import make_env

    env = make_env(monkeypatch, tmp_path)
    env.write("a", {**env.unet_layers(include=["attn2", "proj_in"]), **env.te_layers()}, seed=1)
    env.write("b", env.unet_layers(include=["attn1"]), seed=2)
    from modules import sd_samplers_cfg_denoiser

    counter, counts = _count_during(monkeypatch, sd_samplers_cfg_denoiser.CFGDenoiser)
    env.run("a fox <lora:a> <lora:b>", {}, negative_prompt="n", steps=3, batch_size=2)
    assert counts["evaluations"] == 3
    assert counter.reads == []
    assert counts["flag_reads"] == counts["evaluations"]
