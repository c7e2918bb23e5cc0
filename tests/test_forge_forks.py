"""Forge Classic, reForge and Forge Neo: the Forge adapter over each fork's call protocol.

Each fork's differences (module names, LoRA patch shapes, merge functions, sampler
arguments, prompt parser, built-in LoRA) are laid over the fake Forge by
``fake_forge.forks``; references are computed the same independent way as for Forge.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
import torch
from fake_forge.forks import FORKS, WeightAdapter
from fake_forge.harness import make_env, reference_run

from loratorio import host_forge_backend
from loratorio.host_forge_backend import backups, low_rank_parts, needs_base_weight, patch_kind

ATOL = 2e-4


def _latents(processed):
    return torch.stack(processed.latents)


def _two_loras(env):
    env.write("ink", {**env.unet_layers(include=["attn2", "proj_in", "input_blocks.0.0"]), **env.te_layers()}, seed=1)
    env.write("glow", {**env.unet_layers(include=["attn1", "ff.net", "out.2"]),
                       **env.te_layers(include=["mlp.fc2", "self_attn.v_proj"])}, seed=2, rank=3)
    return "a red fox <lora:ink:0.9> in snow <lora:glow:0.7:1.2>", [("ink", 0.9, 0.9), ("glow", 0.7, 1.2)]


@pytest.mark.parametrize("fork", ["forge", *FORKS])
def test_each_fork_is_told_apart_by_its_modules(monkeypatch, tmp_path, fork):
    make_env(monkeypatch, tmp_path, with_script=False, fork=fork)
    backend = host_forge_backend.detect()
    assert backend.name == fork
    assert backend.family == ("forge2" if fork in ("forge", "neo") else "forge1")


def test_without_a_forge_backend_the_cause_is_named(monkeypatch):
    for name in ("backend", "backend.sampling", "backend.sampling.sampling_function", "ldm_patched"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match="neither Forge's 'backend' nor 'ldm_patched'"):
        host_forge_backend.detect()


@pytest.mark.parametrize("fork", FORKS)
def test_fork_generation_equals_merged_branches_in_one_call_per_step(monkeypatch, tmp_path, fork):
    env = make_env(monkeypatch, tmp_path, fork=fork)
    prompt, branches = _two_loras(env)
    w0 = env.weights()
    from backend.sampling import sampling_function

    _, out = env.run(prompt, {"composition_map": True}, negative_prompt="blurry", batch_size=2, cfg_scale=6.0,
                     steps=3)
    calls = list(sampling_function.CALLS)
    ref = reference_run(env, prompt, branches, negative_prompt="blurry", batch_size=2, cfg_scale=6.0, steps=3)
    torch.testing.assert_close(_latents(out)[:2], ref, rtol=1e-4, atol=ATOL)
    # one sampler call per step (its cond and uncond rows; the branch rows join it inside the model-function
    # wrapper): a branch call of its own would be a further call through calc_cond_uncond_batch
    assert [c["rows"] for c in calls] == [2 * 2] * 3
    info = out.infotexts[0]
    assert "LoRAtorio LoRAs: ink, glow" in info
    assert "Lora hashes: " in info and "ink: " in info and "glow: " in info
    assert len(out.images) == 4  # two images and their composition maps
    w1 = env.weights()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert env.hooks() == 0


def test_reforge_cfg1_has_no_uncond_prediction_and_composes_the_cond(monkeypatch, tmp_path):
    env = make_env(monkeypatch, tmp_path, fork="reforge")
    prompt, branches = _two_loras(env)
    _, out = env.run(prompt, {}, cfg_scale=1.0, steps=3)
    ref = reference_run(env, prompt, branches, cfg_scale=1.0, steps=3)
    torch.testing.assert_close(_latents(out), ref, rtol=1e-4, atol=ATOL)
    assert "re-centring not applied: no unconditional pass (CFG scale 1)" in out.infotexts[0]


def test_classic_merge_into_base_lora_applies_once_and_composed_ones_never(monkeypatch, tmp_path):
    """Classic's built-in applies LoRAs on top of the objects it finds; the second activation starts clean."""
    env = make_env(monkeypatch, tmp_path, fork="classic")
    prompt, branches = _two_loras(env)
    env.write("base", env.unet_layers(include=["attn2.to_k", "out.2"]), seed=9, std=0.5)
    prompt += " <lora:base:0.8>"
    _, out = env.run(prompt, {"merge_into_base": ["base"]}, negative_prompt="blurry", cfg_scale=6.0)
    ref = reference_run(env, prompt, branches, negative_prompt="blurry", cfg_scale=6.0, merged=[("base", 0.8, 0.8)])
    torch.testing.assert_close(_latents(out), ref, rtol=1e-4, atol=ATOL)
    hashes = out.infotexts[0].split("Lora hashes: ")[1]
    assert all(f"{name}: " in hashes for name in ("ink", "glow", "base"))
    # the next plain generation is what it was before LoRAtorio ran
    _, plain = env.run("a red fox", None)
    _, again = env.run("a red fox", None)
    assert torch.equal(_latents(plain), _latents(again))


@pytest.mark.parametrize("fork", FORKS)
def test_bad_loras_on_forks_are_reported_and_the_rest_composes(monkeypatch, tmp_path, fork):
    env = make_env(monkeypatch, tmp_path, fork=fork)
    prompt, _ = _two_loras(env)
    (env.lora_dir / "broken.safetensors").write_bytes(b"\x00" * 10)
    env.write_raw("alien", {f"lora_unet_nowhere_{i}.lora_up.weight": torch.zeros(4, 2) for i in range(20)})
    import networks

    networks.list_available_networks()
    _, out = env.run(prompt + " <lora:broken> <lora:alien> <lora:missing>", {})
    info = out.infotexts[0]
    assert "LoRAtorio LoRAs: ink, glow" in info
    assert "broken: could not be loaded" in info
    assert "alien: " in info and "missing: not found" in info
    assert torch.isfinite(_latents(out)).all()


# -- patch values and backups in every fork's shape -----------------------------------------------------


def test_patch_values_of_every_fork_read_the_same():
    up, down, dora = torch.randn(6, 2), torch.randn(2, 5), torch.ones(6, 1)
    forge = ("lora", (up, down, 2.0, None, None))
    classic_old = ("lora", (up, down, 2.0, None))
    classic = ("lora", (up, down, 2.0, None, None, None))
    adapter = WeightAdapter("lora", (up, down, 2.0, None, None, None))
    for value in (forge, classic_old, classic, adapter):
        assert patch_kind(value) == "lora"
        parts = low_rank_parts(value)
        assert parts[0] is up and parts[1] is down and parts[2] == 2.0 and parts[3] is None
        assert not needs_base_weight(value)
    for value in (("lora", (up, down, 2.0, None, dora)), ("lora", (up, down, 2.0, None, dora, None)),
                  WeightAdapter("lora", (up, down, 2.0, None, dora, None))):
        assert low_rank_parts(value) is None and needs_base_weight(value)
    reshaped = WeightAdapter("lora", (up, down, 2.0, None, None, [6, 5]))
    assert low_rank_parts(reshaped) is None  # BFL control LoRAs change the shape: the host's merge decides
    assert patch_kind((torch.zeros(3),)) == "diff" and patch_kind(("set", (torch.zeros(3),))) == "set"
    assert needs_base_weight(WeightAdapter("oft", (torch.zeros(2),))) and needs_base_weight(("glora", ()))
    assert not needs_base_weight(WeightAdapter("loha", (1, 2, None, 3, 4, None, None, None)))
    assert needs_base_weight(("lokr", (1, 2, None, 3, 4, 5, 6, 7, dora)))


def test_backups_of_every_fork_layout():
    w = torch.randn(3, 3)
    forge = SimpleNamespace(lora_loader=SimpleNamespace(backup={"a.weight": w}))
    classic = SimpleNamespace(backup={"a.weight": w})
    neo = SimpleNamespace(backup={"a.weight": SimpleNamespace(weight=w, inplace_update=False)})
    for patcher in (forge, classic, neo):
        assert backups(patcher)["a.weight"] is w
    assert backups(None) == {}


def test_hashes_are_read_back_where_the_builtin_keeps_no_dict():
    from loratorio.generation import GenerationState
    from loratorio.host_lifecycle import set_lora_hashes
    from loratorio.loading import Branch, BranchSpec, LoraFile
    from loratorio.settings import Settings

    p = SimpleNamespace(extra_generation_params={"Lora hashes": "kept: 111, gone: 222"})
    state = GenerationState(Settings(enabled=True))
    state.branches = [Branch(BranchSpec("pool"), LoraFile("pool", "/x"), {}, {}, {})]
    state.skipped = {"gone": "not found"}
    entry = SimpleNamespace(shorthash="333", read_hash=lambda: None)
    nets = SimpleNamespace(available_network_aliases={"pool": entry}, available_networks={})
    set_lora_hashes(p, state, nets, SimpleNamespace(lora_add_hashes_to_infotext=True))
    assert p.extra_generation_params["Lora hashes"] == "kept: 111, pool: 333"


def test_a_loader_error_without_a_message_names_its_cause(monkeypatch, tmp_path):
    """Forge Classic re-raises a corrupt file's error as a bare ``ValueError`` (``from None``)."""
    env = make_env(monkeypatch, tmp_path, with_script=False, fork="classic")
    import ldm_patched.modules.utils as utils

    from loratorio.host_forge_lora import ForgeBridge
    from loratorio.loading import LoraFile, LoraLoadError

    def load_torch_file(path, safe_load=False, device=None):
        try:
            raise OSError("Error while deserializing header: MetadataIncompleteBuffer")
        except OSError:
            raise ValueError from None

    monkeypatch.setattr(utils, "load_torch_file", load_torch_file)
    with pytest.raises(LoraLoadError, match=r"cannot read .*: Error while deserializing header"):
        ForgeBridge(env.engine).load_lora(LoraFile.at("broken", str(tmp_path / "broken.safetensors")))
