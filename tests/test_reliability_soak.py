"""Soak with fault injection through both fake hosts (``tests/soak.py``), and proof that its checks bite.

``test_soak_with_fault_injection`` runs half of ``soak.CI_GENERATIONS`` random generations
per host, each with a random fault or none, then replays them for the memory measure.
The seed is fixed (``LORATORIO_SOAK_SEED`` overrides it) and printed. The 500-generation
run is ``python -m tests.soak --long``, or this file with ``LORATORIO_SOAK_LONG=1``.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys

import pytest
import torch

from tests import soak

SEED = int(os.environ.get("LORATORIO_SOAK_SEED", soak.DEFAULT_SEED))


def _assert_clean(report: soak.HostReport, n: int) -> None:
    assert not report.failures, "\n".join(report.failures[:10])
    assert report.generations == 2 * n  # the plan and its replay
    missing = [k for k in (*soak.EXCEPTION_KINDS, *soak.STOP_KINDS) if not report.fired[k]]
    assert not missing, f"fault kinds that never fired: {missing} ({report.summary()})"
    assert report.composed >= n, report.summary()  # most generations composed LoRAs
    assert report.rss_growth < soak.RSS_LIMIT, report.summary()


@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_soak_with_fault_injection(host, monkeypatch, tmp_path):
    n = soak.CI_GENERATIONS // 2
    lines: list[str] = []
    report = soak.run_host(host, n, SEED, monkeypatch, tmp_path, log=lines.append)
    print("\n".join(lines))
    _assert_clean(report, n)
    assert len(report.hooks_fired) >= 5, report.summary()  # faults reached many different hooks


@pytest.mark.skipif(not os.environ.get("LORATORIO_SOAK_LONG"),
                    reason="500 generations: set LORATORIO_SOAK_LONG=1 (or run python -m tests.soak --long)")
@pytest.mark.parametrize("host", ["a1111", "forge"])
def test_soak_long(host, monkeypatch, tmp_path):
    n = soak.LONG_GENERATIONS // 2
    lines: list[str] = []
    report = soak.run_host(host, n, SEED, monkeypatch, tmp_path, log=lines.append)
    print("\n".join(lines))
    _assert_clean(report, n)
    assert set(report.hooks_fired) == set(report.hooks), report.summary()  # every hook got its fault


# -- the checks catch what they are there for ------------------------------------------------------


SPEC = {"a1111": dict(model="sd1", prompt="a cat <lora:sd1_0> <lora:sd1_1:0.7>", sampler="Euler"),
        "forge": dict(model="sd15", prompt="a cat <lora:sd15_0> <lora:sd15_1:0.7>", sampler="Euler")}


def _planted(host: str, monkeypatch, tmp_path, plant, fault: soak.Fault | None = None) -> soak.HostReport:
    """One soak generation (and its plain follow-up) with a defect planted in the extension."""
    driver, baseline = soak.start(host, monkeypatch, tmp_path)
    report = soak.HostReport(host, SEED)
    spec = soak.GenSpec(negative="ugly", steps=2, width=32, height=32, cfg=5.0,
                        args=[{"recenter": 0.5, "text_encoder_per_branch": True}], **SPEC[host])
    with contextlib.ExitStack() as stack:
        plant(driver, stack)
        soak.run_generation(driver, report, 0, spec, fault or soak.Fault(), baseline, monkeypatch)
    return report


def _hook_left(driver, stack):
    from loratorio import routing

    original = routing.Router.route

    def route(self, rows):
        self.modules[0].register_forward_hook(lambda *a: None)  # never removed
        return original(self, rows)

    stack.enter_context(_patched(routing.Router, "route", route))


def _weights_written(driver, stack):
    from loratorio import routing

    original = routing._ModulePlan.run
    done = []

    def apply(plan, x, out, jobs):
        if not done and hasattr(plan.module, "weight"):
            done.append(True)
            with torch.no_grad():
                plan.module.weight.mul_(1.001)
        return original(plan, x, out, jobs)

    stack.enter_context(_patched(routing._ModulePlan, "run", apply))


def _generation_kept(driver, stack):
    kept = []
    original = driver.host.process

    def process(p, *args):
        kept.append(p)  # a module-level list in real code
        return original(p, *args)

    stack.enter_context(_patched(driver.host, "process", process))
    stack.callback(kept.clear)


def _error_swallowed(driver, stack):
    # every hook's guard reports through the ``fail`` of the host's step module
    step_module = importlib.import_module(f"{driver.host.__name__}_step")
    stack.enter_context(_patched(step_module, "fail", lambda *a, **k: None))


def _original_patcher_touched(driver, stack):
    original = driver.host.install_pass

    def install_pass(p, state, *args, **kwargs):
        ctx = original(p, state, *args, **kwargs)
        p.sd_model.forge_objects_original.unet.set_model_sampler_post_cfg_function(lambda args: args["denoised"])
        return ctx

    stack.enter_context(_patched(driver.host, "install_pass", install_pass))


@contextlib.contextmanager
def _patched(owner, name, value):
    old = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


PLANTED = [
    ("a1111", "hook left", _hook_left, None, "hooks left"),
    ("forge", "hook left", _hook_left, None, "hooks left"),
    ("a1111", "weights written", _weights_written, None, "model weights changed by the generation"),
    ("forge", "weights written", _weights_written, None, "model weights changed by the generation"),
    ("a1111", "generation kept", _generation_kept, None, "the processing object is still alive"),
    ("forge", "generation kept", _generation_kept, None, "the processing object is still alive"),
    ("a1111", "error swallowed", _error_swallowed, soak.Fault("fusion", at=1, token="planted-token"),
     "the injected exception was not reported anywhere"),
    ("forge", "error swallowed", _error_swallowed, soak.Fault("fusion", at=1, token="planted-token"),
     "the injected exception was not reported anywhere"),
    ("forge", "original patcher touched", _original_patcher_touched, None, "original unet options changed"),
]


@pytest.mark.parametrize("host, what, plant, fault, expected", PLANTED, ids=[f"{h}-{w}" for h, w, *_ in PLANTED])
def test_the_checks_catch_planted_defects(monkeypatch, tmp_path, host, what, plant, fault, expected):
    report = _planted(host, monkeypatch, tmp_path, plant, fault)
    assert any(expected in f for f in report.failures), report.failures


def test_the_plain_generation_check_catches_a_changed_result(monkeypatch, tmp_path):
    driver, baseline = soak.start("forge", monkeypatch, tmp_path)
    report = soak.HostReport("forge", SEED)
    key = ("sd15", 0)
    driver.references[key] = driver.references[key] + 1e-6  # as if the plain run had drifted
    soak._plain_check(driver, report, 0, "sd15", 0, baseline, "planted")
    assert any("differs from the run without the extension" in f for f in report.failures), report.failures


def test_the_memory_check_catches_a_leak(monkeypatch, tmp_path):
    kept: list = []
    from loratorio import host_forge

    original = host_forge.process

    def leaky(p, *args):
        kept.append(bytes(range(256)) * (4 << 12))  # 4 MiB per generation, written (resident)
        return original(p, *args)

    monkeypatch.setattr(host_forge, "process", leaky)
    report = soak.run_host("forge", 4, SEED, monkeypatch, tmp_path, log=lambda _: None)
    kept.clear()
    assert report.rss_growth >= soak.RSS_LIMIT, report.summary()


def test_the_seed_reproduces_the_plan(monkeypatch, tmp_path):
    driver, _ = soak.start("forge", monkeypatch, tmp_path)
    first = soak.plan(driver, 12, SEED)
    again = soak.plan(driver, 12, SEED)
    other = soak.plan(driver, 12, SEED + 1)
    assert [(s.describe(), f.describe()) for s, f in first] == [(s.describe(), f.describe()) for s, f in again]
    assert [s.describe() for s, _ in first] != [s.describe() for s, _ in other]


def test_command_line_runs_and_prints_the_seed(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["soak"])
    assert soak.main(["-n", "2", "--seed", "7", "--hosts", "forge"]) == 0
    out = capsys.readouterr().out
    assert "seed 7" in out and out.rstrip().endswith("OK")
