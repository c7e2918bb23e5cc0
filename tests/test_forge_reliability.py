"""Forge: nothing corrupted, nothing left attached, every bad input answered."""

from __future__ import annotations

import hashlib

import pytest
import torch
from fake_forge.harness import make_env, reference_run

from loratorio import host_forge, host_forge_fold, host_forge_pass, host_forge_step, routing


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def _latents(processed):
    return torch.stack(processed.latents)


def _clean(env, w0):
    w1 = env.weights()
    assert all(torch.equal(w0[k], w1[k]) for k in w0), "a weight changed"
    assert env.hooks() == 0, "a hook was left attached"
    # Forge holds the patcher it had before the pass, not our clone with the step function
    unet = env.engine.forge_objects.unet
    assert unet is env.engine.forge_objects_after_applying_lora.unet
    assert not unet.model_options.get("sampler_post_cfg_function")


def _two_loras(env):
    env.write("a", {**env.unet_layers(include=["attn2", "proj_in"]), **env.te_layers()}, seed=1)
    env.write("b", env.unet_layers(include=["attn1", "out.2"]), seed=2)
    return "a fox <lora:a> <lora:b:0.8>"


def _inject(mp, where, boom):
    if where == "fusion":
        from loratorio.engine import Composer

        calls = {"n": 0}
        original = Composer.fuse

        def fuse(self, **kw):
            calls["n"] += 1
            if calls["n"] == 2:
                raise boom
            return original(self, **kw)

        mp.setattr(Composer, "fuse", fuse)
    elif where == "model_call":
        original_apply = routing._ModulePlan.run

        def apply(self, x, out, jobs):
            if "attn1" in self.name:
                raise boom
            return original_apply(self, x, out, jobs)

        mp.setattr(routing._ModulePlan, "run", apply)
    elif where == "text_encoder":
        def texts(*a, **k):
            raise boom

        mp.setattr(host_forge_pass, "branch_texts", texts)
    else:  # our second activation of the built-in LoRA fails
        from modules import extra_networks

        builtin = extra_networks.extra_network_registry["lora"]
        real = type(builtin).activate
        seen = {"n": 0}

        def first_only(p, params):
            seen["n"] += 1
            if seen["n"] > 1:
                raise boom
            return real(builtin, p, params)

        mp.setattr(builtin, "activate", first_only)


@pytest.mark.parametrize("where", ["fusion", "model_call", "text_encoder", "builtin_lora"])
def test_an_error_inside_our_hooks_stops_cleanly_and_the_next_generation_works(monkeypatch, tmp_path, where):
    env = make_env(monkeypatch, tmp_path)
    prompt = _two_loras(env)
    w0 = env.weights()
    _, plain_before = env.run(prompt, None, negative_prompt="n")  # the extension off: the built-in merges both
    with pytest.MonkeyPatch.context() as mp:
        _inject(mp, where, RuntimeError("injected failure"))
        _, out = env.run(prompt, {}, negative_prompt="n")
    from modules import errors, shared

    assert shared.state.interrupted
    assert any("injected failure" in str(msg) for _, msg in errors.REPORTED)
    assert "stopped by an error" in out.infotexts[0] and "injected failure" in out.infotexts[0]
    _clean(env, w0)
    _, plain = env.run(prompt, None, negative_prompt="n")
    assert torch.equal(_latents(plain), _latents(plain_before))
    _, composed = env.run(prompt, {}, negative_prompt="n")
    ref = reference_run(env, prompt, [("a", 1, 1), ("b", 0.8, 0.8)], negative_prompt="n")
    torch.testing.assert_close(_latents(composed), ref, rtol=1e-4, atol=2e-4)
    _clean(env, w0)


def test_same_model_after_an_error_gives_bit_identical_plain_generations(monkeypatch, tmp_path):
    env = make_env(monkeypatch, tmp_path)
    prompt = _two_loras(env)
    w0 = env.weights()
    _, before = env.run(prompt, None)
    _, before_nolora = env.run("a fox", None)
    original = routing._ModulePlan.run

    def apply(self, x, out, jobs):
        raise RuntimeError("inside a branch call")

    monkeypatch.setattr(routing._ModulePlan, "run", apply)
    env.run(prompt, {})
    monkeypatch.setattr(routing._ModulePlan, "run", original)
    _clean(env, w0)
    _, after = env.run(prompt, None)
    _, after_nolora = env.run("a fox", None)
    assert torch.equal(_latents(after), _latents(before))
    assert torch.equal(_latents(after_nolora), _latents(before_nolora))


def test_keyboard_interrupt_inside_a_branch_call_leaves_nothing_attached(monkeypatch, tmp_path):
    env = make_env(monkeypatch, tmp_path)
    prompt = _two_loras(env)
    w0 = env.weights()

    def apply(self, x, out, jobs):
        raise KeyboardInterrupt

    monkeypatch.setattr(routing._ModulePlan, "run", apply)
    with pytest.raises(KeyboardInterrupt):
        env.run(prompt, {})
    assert env.hooks() == 0
    w1 = env.weights()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_user_interrupt_mid_generation(monkeypatch, tmp_path):
    env = make_env(monkeypatch, tmp_path)
    prompt = _two_loras(env)
    w0 = env.weights()
    from modules import shared

    original = host_forge_step._post_cfg
    count = {"n": 0}

    def post_cfg(*a, **k):
        count["n"] += 1
        if count["n"] == 2:
            shared.state.interrupt()
        return original(*a, **k)

    monkeypatch.setattr(host_forge_step, "_post_cfg", post_cfg)
    _, _out = env.run(prompt, {}, steps=5)
    assert count["n"] == 2  # step 1 interrupts; the sampler stops before step 2
    _clean(env, w0)


def test_no_lora_composed_is_a_plain_generation_bit_for_bit(monkeypatch, tmp_path):
    env = make_env(monkeypatch, tmp_path)
    _two_loras(env)
    _, plain = env.run("a fox <lora:a>", None)
    _, on = env.run("a fox <lora:a>", {"merge_into_base": ["a"]})
    assert torch.equal(_latents(plain), _latents(on))
    _, plain = env.run("a fox", None)
    _, on = env.run("a fox", {})
    assert torch.equal(_latents(plain), _latents(on))
    assert "no LoRA to compose" in on.infotexts[0]


def test_bad_loras_are_skipped_with_a_reason_and_the_others_composed(monkeypatch, tmp_path):
    env = make_env(monkeypatch, tmp_path)
    _two_loras(env)
    from lora_files import lora_tensors

    (env.lora_dir / "broken.safetensors").write_bytes(b"\x00\x01not a safetensors file")
    env.write_raw("ckpt", {"model.diffusion_model.out.2.weight": torch.zeros(4, 16, 3, 3)})
    env.write_raw("xl", lora_tensors({"lora_unet_input_blocks_4_1_proj_in": (640, 640)}, seed=3))
    env.write_raw("nan", lora_tensors(env.unet_layers(include=["attn2.to_q"]), seed=4, poison="nan"))
    # an SDXL LoRA on SD1.5: its lora_te1_ layers fit CLIP-L, its CLIP-G layers match nothing
    clip_g = {f"lora_te2_text_model_encoder_layers_{i}_mlp_fc1": (64, 32) for i in range(5)}
    env.write_raw("sdxl", lora_tensors({**env.te_layers(prefix="lora_te1_"), **clip_g}, seed=5))
    import networks

    networks.list_available_networks()
    prompt = "a fox <lora:a> <lora:missing> <lora:broken> <lora:ckpt> <lora:xl> <lora:nan> <lora:sdxl> <lora:b:0.8>"
    _, out = env.run(prompt, {})
    info = out.infotexts[0]
    assert "LoRAtorio LoRAs: a, b" in info
    assert "missing: not found" in info
    assert "broken: could not be loaded" in info
    assert "ckpt: could not be loaded (not a LoRA file" in info
    assert "xl: matches no layer" in info
    assert "nan: contains NaN" in info
    assert "sdxl: could not be loaded (15 of its" in info and "match no layer of this model" in info
    # Forge renamed the unreadable file and said so in several lines; the reason stays on the parameters line
    assert (env.lora_dir / "broken.safetensors.corrupted").exists()
    params = info.splitlines()[-1]
    assert len(info.splitlines()) == 2 and "tried to move the corrupted file" in params
    # the built-in's own activation died on the unknown name; the composed LoRAs keep their hashes
    hashes = params.split("Lora hashes: ")[1].strip('"')
    assert hashes == f"a: {_sha(env.files['a'])}, b: {_sha(env.files['b'])}"
    ref = reference_run(env, "a fox <lora:a> <lora:b:0.8>", [("a", 1, 1), ("b", 0.8, 0.8)])
    torch.testing.assert_close(_latents(out), ref, rtol=1e-4, atol=2e-4)


def test_invalid_api_arguments_refuse_the_job_with_the_field_named(monkeypatch, tmp_path):
    env = make_env(monkeypatch, tmp_path)
    prompt = _two_loras(env)
    p, out = env.run(prompt, {"recenter": "high"})
    message = "LoRAtorio setting 'recenter' must be a number (0 to 1), got 'high' (str)"
    assert p.extra_generation_params["LoRAtorio note"] == f"refused: {message}"
    assert out.comments.splitlines() == [message]
    from modules import shared

    assert shared.state.interrupted
    assert out.images == [] and out.latents == [] and out.infotexts == []  # refused: no image is made
    _p, out = env.run(prompt, {"lambda": 0.5})
    assert out.comments.startswith("LoRAtorio: unknown LoRAtorio setting(s) 'lambda'; allowed keys: enabled, ")
    assert out.images == []


def test_hires_fix_restarts_the_schedule_and_reuses_branch_texts(monkeypatch, tmp_path):
    env = make_env(monkeypatch, tmp_path)
    prompt = _two_loras(env)
    w0 = env.weights()
    from backend.sampling import sampling_function

    calls = {"n": 0}
    original = host_forge_pass.branch_texts

    def counted(*a, **k):
        calls["n"] += 1
        return original(*a, **k)

    monkeypatch.setattr(host_forge_pass, "branch_texts", counted)
    steps_seen = []
    original_step = host_forge_step.pass_step
    # the step index each model call prepares its branch rows for (the conditioning modifier's)
    monkeypatch.setattr(host_forge_fold, "pass_step", lambda d: steps_seen.append(original_step(d)) or steps_seen[-1])
    p, _out = env.run(prompt, {}, enable_hr=True, hr_second_pass_steps=2, denoising_strength=0.5, steps=3)
    assert calls["n"] == 2  # first pass and hires pass (Forge calls the hook twice for the hires pass)
    assert p.scripts.calls.count("process_before_every_sampling") == 3
    assert steps_seen == [0, 1, 2, 0, 1]
    hires_rows = [c for c in sampling_function.CALLS if c["shape"][-1] == 8]
    # one model call per hires step: Forge's cond and uncond rows, the branch rows riding along
    assert [c["cond_or_uncond"] for c in hires_rows] == [[1, 0], [1, 0]]
    _clean(env, w0)


def test_composition_map_is_an_extra_image(monkeypatch, tmp_path):
    env = make_env(monkeypatch, tmp_path)
    prompt = _two_loras(env)
    _, out = env.run(prompt, {"composition_map": True}, batch_size=2)
    assert len(out.images) == 4 and len(out.infotexts) == 4
    assert out.images[2].size == out.images[0].size


def test_replaced_file_and_switched_model_reload_the_lora(monkeypatch, tmp_path):
    env = make_env(monkeypatch, tmp_path)
    prompt = _two_loras(env)
    env.run(prompt, {})
    assert len(host_forge.CACHE) == 2
    env.write("b", env.unet_layers(include=["attn1", "out.2"]), seed=99, std=0.4)
    _, out = env.run(prompt, {})
    ref = reference_run(env, prompt, [("a", 1, 1), ("b", 0.8, 0.8)])
    torch.testing.assert_close(_latents(out), ref, rtol=1e-4, atol=2e-4)
    from backend.diffusion_engine.engines import FakeEngine
    from modules import shared

    other = FakeEngine("sd15", seed=5)
    shared.sd_model = env.engine = other
    env.seed = 5
    _, out = env.run(prompt, {})
    ref = reference_run(env, prompt, [("a", 1, 1), ("b", 0.8, 0.8)])
    torch.testing.assert_close(_latents(out), ref, rtol=1e-4, atol=2e-4)


def test_img2img_composes_and_leaves_nothing(monkeypatch, tmp_path):
    env = make_env(monkeypatch, tmp_path)
    prompt = _two_loras(env)
    w0 = env.weights()
    init = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(4))
    _, plain = env.run(prompt, None, img2img=True, init_latent=init, denoising_strength=0.7)
    _, composed = env.run(prompt, {}, img2img=True, init_latent=init, denoising_strength=0.7)
    assert "LoRAtorio LoRAs: a, b" in composed.infotexts[0]
    assert (_latents(composed) - _latents(plain)).abs().max() > 1e-3
    _clean(env, w0)


def test_an_error_in_postprocess_names_its_step_and_is_reported_without_losing_the_images(monkeypatch, tmp_path):
    import sys

    env = make_env(monkeypatch, tmp_path)
    prompt = _two_loras(env)
    w0 = env.weights()
    original = host_forge.release_pass

    def release(p, state):
        if sys._getframe(1).f_code.co_name == "postprocess":
            raise RuntimeError("injected restore failure")
        return original(p, state)

    monkeypatch.setattr(host_forge, "release_pass", release)
    from modules import errors

    before = len(errors.REPORTED)
    p, out = env.run(prompt, {}, negative_prompt="n")
    text = ("LoRAtorio: restoring the model after the last pass failed after the images were made: "
            "RuntimeError: injected restore failure")
    assert [msg for _, msg in errors.REPORTED[before:]] == [text]
    assert text in p.comments
    assert out.comments.splitlines()[-1] == text
    assert p.extra_generation_params["LoRAtorio note"] == ("restoring the model after the last pass failed: "
                                                           "injected restore failure")
    assert len(out.images) == 1 and torch.isfinite(_latents(out)).all()
    monkeypatch.setattr(host_forge, "release_pass", original)
    _clean(env, w0)
