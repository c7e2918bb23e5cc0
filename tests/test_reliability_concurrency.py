"""A generation's state lives on its processing object; other threads and later jobs see only their own.

The WebUI runs one generation at a time, but its UI thread keeps working meanwhile (paste
of infotext, the script-info API, the LoRA list refresh). These tests pause a real
generation in the middle of its steps (inside fusion), read from another thread, and
check that later jobs cannot see an earlier job's branches - through both fake hosts.
"""

from __future__ import annotations

import sys
import threading
import weakref

import pytest
import torch

from loratorio import engine, host_ui, routing
from loratorio.engine import Composer
from loratorio.generation import GenerationState, get_state
from loratorio.loading import Branch
from loratorio.routing import Router
from loratorio.settings import INFOTEXT_KEYS, Settings
from tests.soak import light_host

TIMEOUT = 120


@pytest.fixture(params=["a1111", "forge"])
def host(request, monkeypatch, tmp_path):
    from tests.lora_files import write_lora

    h = light_host(request.param, monkeypatch, tmp_path)
    write_lora(h.lora_dir / "good.safetensors", {**h.unet, **h.te}, seed=1)
    write_lora(h.lora_dir / "good2.safetensors", h.unet, seed=2)
    h.refresh()
    return h


def _generation_kinds():
    kinds = [GenerationState, Composer, Router, Branch]
    try:
        from loratorio.host_forge_step import PassContext

        kinds.append(PassContext)
    except ImportError:
        pass
    return tuple(kinds)


def generation_objects_in_globals() -> list[str]:
    """Per-generation objects reachable from module globals of the extension (and its loaded script).

    Containers are followed (dicts, lists, tuples, sets, weak references); other objects
    are not entered, so the processing object a weak pointer may name is not a finding,
    but a state, composer, router or branch kept in a global is.
    """
    kinds = _generation_kinds()
    found: list[str] = []
    seen: set[int] = set()

    def walk(value, path: str, depth: int) -> None:
        if depth > 5 or id(value) in seen:
            return
        seen.add(id(value))
        if isinstance(value, kinds):
            found.append(f"{path}: {type(value).__name__}")
        elif isinstance(value, weakref.ref):
            target = value()
            if target is not None:
                walk(target, path + "()", depth + 1)
        elif isinstance(value, dict):
            for k, v in list(value.items()):
                walk(v, f"{path}[{k!r}]", depth + 1)
        elif isinstance(value, (list, tuple, set, frozenset)):
            for i, v in enumerate(list(value)):
                walk(v, f"{path}[{i}]", depth + 1)

    modules = [m for name, m in list(sys.modules.items())
               if m is not None and (name.startswith("loratorio") or name.startswith("loratorio_script")
                                     or name == "loratorio.py")]
    for module in modules:
        for attr, value in list(vars(module).items()):
            if not attr.startswith("__"):
                walk(value, f"{module.__name__}.{attr}", 0)
    return found


class Pause:
    """Holds a generation inside ``Composer.fuse`` at its ``at``-th call until released."""

    def __init__(self, monkeypatch, at: int = 2):
        self.at, self.calls = at, 0
        self.reached, self.release = threading.Event(), threading.Event()
        self.composer = None
        original = engine.Composer.fuse

        def fuse(composer, **kwargs):
            self.calls += 1
            if self.calls == self.at:
                self.composer = composer
                self.reached.set()
                assert self.release.wait(TIMEOUT), "the test never released the generation"
            return original(composer, **kwargs)

        monkeypatch.setattr(engine.Composer, "fuse", fuse)


def run_in_thread(fn):
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as exc:  # handed to the test thread
            box["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, box


def test_reading_state_from_another_thread_during_a_generation(host, monkeypatch):
    prompt = "a cat <lora:good> <lora:good2:0.7>"
    settings = {"recenter": 0.25, "top_k": 1, "patch_size": 1}
    reference = host.run(prompt, settings)  # the same job, never paused nor read from outside
    pause = Pause(monkeypatch)
    holder: list = []
    thread, box = run_in_thread(lambda: host.run(prompt, settings, prepare=holder.append))
    assert pause.reached.wait(TIMEOUT), box.get("error")
    p = holder[0]
    try:
        state = get_state(p)
        # what the UI thread reads while the job runs: our state (script-info, progress), the paste path,
        # the LoRA list refresh, the configured defaults
        assert state is not None and state.composer is pause.composer
        assert state.names == ["good", "good2"]
        info = state.infotext()
        assert info[INFOTEXT_KEYS["loras"]] == "good, good2"
        assert state.report().startswith("LoRAtorio: composing 2 LoRA(s): good, good2")
        pasted = Settings.from_infotext(info)
        assert pasted["enabled"] and pasted["recenter"] == 0.25 and pasted["top_k"] == 1
        fields = host_ui.paste_fields({name: object() for name in Settings().to_dict()})
        values = [key(info) if callable(key) else info.get(key) for _, key in fields]
        assert values[0] is True and 0.25 in values
        assert {"good", "good2"} <= set(host.host.lora_names())
        assert host.host.defaults() == Settings()
        reader_errors: list = []

        def reader():
            try:
                for _ in range(50):
                    get_state(p).infotext()
                    get_state(p).report()
                    len(host.host.CACHE)
            except BaseException as exc:
                reader_errors.append(exc)

        other = threading.Thread(target=reader)
        other.start()
        other.join(TIMEOUT)
        assert not reader_errors, reader_errors
    finally:
        pause.release.set()
        thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert "error" not in box, box.get("error")
    res = box["result"]
    assert torch.equal(res.latents, reference.latents)  # reading changed nothing
    assert res.params == reference.params


def test_state_is_on_the_processing_object_and_no_global_holds_it(host, monkeypatch):
    pause = Pause(monkeypatch, at=1)
    holder: list = []
    thread, box = run_in_thread(lambda: host.run("a cat <lora:good> <lora:good2>", prepare=holder.append))
    assert pause.reached.wait(TIMEOUT), box.get("error")
    try:
        assert get_state(holder[0]).composer is pause.composer
        leaks = generation_objects_in_globals()
    finally:
        pause.release.set()
        thread.join(TIMEOUT)
    assert "error" not in box, box.get("error")
    assert not leaks, leaks
    assert not generation_objects_in_globals()


def test_a_second_job_cannot_see_the_first_jobs_branches(host, monkeypatch):
    first = host.run("a cat <lora:good> <lora:good2>", {"composition_map": True})
    assert first.names == ["good", "good2"] and first.state.maps
    routes = {"n": 0}
    original = routing.Router.route

    def route(self, rows):
        routes["n"] += 1
        return original(self, rows)

    monkeypatch.setattr(routing.Router, "route", route)
    second = host.run("a dog", {"composition_map": True})
    assert second.state is not first.state
    assert second.names == [] and second.state.branches == [] and second.state.maps == []
    assert routes["n"] == 0  # no branch of the first job ran during the second
    assert second.params[INFOTEXT_KEYS["note"]] == "no LoRA to compose; plain generation"
    assert INFOTEXT_KEYS["loras"] not in second.params
    assert len(second.processed.images) == 1  # no composition map of the first job's LoRAs
    plain = host.run("a dog", False)
    assert torch.equal(second.latents, plain.latents)
    # and the first job's own record is unchanged by the second
    assert first.state.names == ["good", "good2"] and len(first.state.maps) == 1


@pytest.mark.parametrize("builtin_runner", [True, False], ids=["next-job-with-loratorio-off", "next-job-without"])
def test_a_job_after_a_failed_job_is_untouched(host, builtin_runner):
    """Job 1 fails inside the WebUI's own model call (not in LoRAtorio's code) while its processing object is
    still alive (it sits in a reference cycle until the garbage collector runs); job 2 must be a plain job."""
    reference = host.run("a cat", False)
    root = host.model.model.diffusion_model if host.name == "a1111" else \
        host.engine.forge_objects_original.unet.model.diffusion_model
    calls = {"n": 0}

    def fail_second_base_call(module, args):
        # the WebUI's own model call of the second step (the branch rows ride in it: one call per step)
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("CUDA out of memory (the WebUI's own pass)")

    handle = root.register_forward_pre_hook(fail_second_base_call)
    alive: list = []
    try:
        with pytest.raises(RuntimeError, match="out of memory"):
            host.run("a cat <lora:good> <lora:good2>", prepare=alive.append)
    finally:
        handle.remove()
    # LoRAtorio in the runner but switched off, or a runner without it (another extension's own pass)
    second = host.run("a cat", False, prepare=None if builtin_runner else _without_scripts)
    assert not second.reported, second.reported
    assert not second.interrupted
    assert torch.equal(second.latents, reference.latents)
    assert alive  # job 1's processing object was alive all along


def _without_scripts(p):
    p.scripts = None
