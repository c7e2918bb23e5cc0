"""Model calls of one composed step, counted through each fake host's model.

A whole generation (N = 4 LoRAs, lambda 0.5, batch 2, 3 steps) runs through the real
script and host module on the fake AUTOMATIC1111 (``tests/fake_a1111``) and the fake
Forge (``tests/fake_forge``), which follow the real hosts' call protocol. Each fake's
model counts its calls (the UNet's forward on A1111, ``KModel.apply_model`` on Forge);
divided by the denoiser evaluations of the generation, that is the number of model calls
one composed step costs (a plain step costs 1).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
N = 4
STEPS = 3


def _paths() -> None:
    for path in (ROOT, ROOT / "tests"):
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))


def _count(monkeypatch, denoiser_class) -> list:
    evaluations = []
    forward = denoiser_class.forward

    def counted(self, *args, **kwargs):
        evaluations.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(denoiser_class, "forward", counted)
    return evaluations


def a1111_calls_per_step(monkeypatch, tmp: Path) -> float:
    from loratorio.settings import Settings
    from tests import fake_a1111 as fa
    from tests.fake_a1111.model import TinySD
    from tests.lora_files import conv_and_linear_shapes, write_lora

    model = TinySD()
    shapes = conv_and_linear_shapes(model.model.diffusion_model, "lora_unet_", include=["attn", "proj", "ff"])
    names = [f"l{i}" for i in range(N)]
    for i, name in enumerate(names):
        write_lora(tmp / f"{name}.safetensors", shapes, rank=4, seed=100 + i)
    fake = fa.install(monkeypatch, model=model, lora_dir=tmp)
    _, runner = fa.load_script(fake)
    evaluations = _count(monkeypatch, fake.sd_samplers_cfg_denoiser.CFGDenoiser)
    prompt = "a cat " + " ".join(f"<lora:{n}>" for n in names)
    p = fa.make_p(fake, runner, Settings(enabled=True, recenter=0.5).to_args(), prompt=prompt,
                  negative_prompt="blurry", steps=STEPS, batch_size=2)
    unet = model.model.diffusion_model
    before = unet.calls
    fake.processing.process_images(p)
    if fake.errors.reported or p.loratorio_state is None or len(p.loratorio_state.names) != N:
        raise RuntimeError(f"the fake A1111 generation did not compose {N} LoRAs: {fake.errors.reported}")
    return (unet.calls - before) / len(evaluations)


def forge_calls_per_step(monkeypatch, tmp: Path) -> float:
    from fake_forge.harness import make_env

    env = make_env(monkeypatch, tmp)
    names = [f"l{i}" for i in range(N)]
    for i, name in enumerate(names):
        env.write(name, env.unet_layers(include=["attn", "proj", "ff"]), seed=200 + i)
    from modules import sd_samplers_cfg_denoiser

    evaluations = _count(monkeypatch, sd_samplers_cfg_denoiser.CFGDenoiser)
    model = env.engine.forge_objects.unet.model
    before = model.calls
    p, _ = env.run("a cat " + " ".join(f"<lora:{n}>" for n in names), {"recenter": 0.5}, negative_prompt="blurry",
                   steps=STEPS, batch_size=2)
    state = getattr(p, "loratorio_state", None)
    if state is not None and state.error is not None:
        raise RuntimeError(f"the fake Forge generation failed: {state.error}")
    return (model.calls - before) / len(evaluations)


def measure() -> dict:
    """``{"a1111": calls per step, "forge": calls per step}``."""
    import pytest

    _paths()
    out = {}
    threads = torch.get_num_threads()
    for name, fn in (("a1111", a1111_calls_per_step), ("forge", forge_calls_per_step)):
        with tempfile.TemporaryDirectory() as tmp, pytest.MonkeyPatch.context() as mp:
            lora_dir = Path(tmp) / "Lora"
            lora_dir.mkdir()
            out[name] = fn(mp, lora_dir if name == "a1111" else Path(tmp))
    torch.set_num_threads(threads)
    return out


if __name__ == "__main__":
    print(measure())
