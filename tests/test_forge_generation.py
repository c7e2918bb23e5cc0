"""Whole generations through the real script and host module on the fake Forge.

The reference for every comparison is computed independently: one merged model copy
per LoRA (its UNet/DiT and text encoder), the base model, ``loratorio.fusion.compose``
on their predictions, Forge's CFG and the same sampler update.
"""

from __future__ import annotations

import pytest
import torch
from fake_forge.harness import make_env, reference_run

ATOL = 2e-4


def _unet_lora(env, name, include, seed, **kw):
    env.write(name, env.unet_layers(include=include), seed=seed, **kw)


def _assert_same(a, b, atol=ATOL):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=atol)


def _latents(processed):
    return torch.stack(processed.latents)


def test_sd15_two_loras_with_text_encoders_equal_merged_branches(monkeypatch, tmp_path):
    env = make_env(monkeypatch, tmp_path)
    env.write("ink", {**env.unet_layers(include=["attn2", "proj_in", "input_blocks.0.0"]), **env.te_layers()}, seed=1)
    env.write("glow", {**env.unet_layers(include=["attn1", "ff.net", "out.2"]),
                       **env.te_layers(include=["mlp.fc2", "self_attn.v_proj"])}, seed=2, rank=3)
    w0 = env.weights()
    prompt = "a red fox <lora:ink:0.9> in snow <lora:glow:0.7:1.2>"
    settings = {"recenter": 1.0, "temperature_scale": 10.0}
    _, out = env.run(prompt, settings, negative_prompt="blurry", batch_size=2, cfg_scale=6.0)
    from backend.text_processing import classic_engine

    engine_params_after_run = dict(classic_engine.last_extra_generation_params)
    ref = reference_run(env, prompt, [("ink", 0.9, 0.9), ("glow", 0.7, 1.2)], negative_prompt="blurry",
                        batch_size=2, cfg_scale=6.0)
    _assert_same(_latents(out), ref)
    # each branch's own text encoder mattered: with the base text for every branch the result differs
    base_text = reference_run(env, prompt, [("ink", 0.9, 0.9), ("glow", 0.7, 1.2)], negative_prompt="blurry",
                              batch_size=2, cfg_scale=6.0, text_encoder_per_branch=False)
    assert (base_text - ref).abs().max() > 50 * ATOL
    info = out.infotexts[0]
    assert "LoRAtorio LoRAs: ink, glow" in info and "Lora hashes: ink:" in info and "glow:" in info
    w1 = env.weights()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    assert env.hooks() == 0
    # the branch text passes left nothing in Forge's text-engine infotext global
    assert engine_params_after_run == {}
    # the UNet patcher Forge holds is the one it had before the pass, without our step
    assert env.engine.forge_objects.unet is env.engine.forge_objects_after_applying_lora.unet


def test_composed_result_differs_from_plain_and_from_merging(monkeypatch, tmp_path):
    env = make_env(monkeypatch, tmp_path)
    _unet_lora(env, "a", ["attn2", "proj_in"], 3, std=0.6)
    _unet_lora(env, "b", ["attn1", "out.2"], 4, std=0.6)
    prompt = "a house <lora:a> <lora:b>"
    _, composed = env.run(prompt, {"recenter": 0.5})
    _, plain = env.run(prompt, None)  # LoRAtorio off: the built-in merges both
    merged = reference_run(env, "a house", [], merged=[("a", 1.0, 1.0), ("b", 1.0, 1.0)])
    _assert_same(_latents(plain), merged)
    assert (_latents(composed) - _latents(plain)).abs().max() > 1e-2


def test_flux_cfg1_composes_cond_only_and_says_recentring_was_not_applied(monkeypatch, tmp_path):
    env = make_env(monkeypatch, tmp_path, kind="flux")
    cfg = env.engine.forge_objects.unet.model.diffusion_model.config
    h = cfg["hidden_size"]
    d, s = "transformer.transformer_blocks.0.attn.", "transformer.single_transformer_blocks.0."
    env.write("fx1", {d + "to_q": (h, h), d + "to_v": (h, h), s + "proj_mlp": (cfg["mlp_hidden"], h),
                      **env.te_layers("t5xxl", include=["SelfAttention.q", "DenseReluDense.wi"])}, seed=5)
    env.write("fx2", {**env.unet_layers(include=["img_attn.qkv", "linear2", "img_mlp"]),
                      **env.te_layers("clip_l", prefix="lora_te1_")}, seed=6)
    from backend.sampling import sampling_function

    prompt = "a lighthouse <lora:fx1:1> <lora:fx2:0.8>"
    _p, out = env.run(prompt, {"recenter": 0.5}, cfg_scale=1.0, width=40, height=24)
    ref = reference_run(env, prompt, [("fx1", 1.0, 1.0), ("fx2", 0.8, 0.8)], cfg_scale=1.0, width=40, height=24)
    _assert_same(_latents(out), ref)
    assert all(1 not in call["cond_or_uncond"] for call in sampling_function.CALLS)  # no uncond pass anywhere
    assert "re-centring not applied" in out.infotexts[0]
    assert _latents(out).shape[1] == 16


def test_flux_cfg_above_1_recentres(monkeypatch, tmp_path):
    env = make_env(monkeypatch, tmp_path, kind="flux")
    env.write("fa", env.unet_layers(include=["img_attn", "single_blocks.0.linear1"]), seed=7)
    env.write("fb", env.unet_layers(include=["txt_attn", "img_mlp.0"]), seed=8)
    prompt = "a castle <lora:fa> <lora:fb>"
    _, out = env.run(prompt, {"recenter": 0.7}, cfg_scale=3.0, negative_prompt="fog")
    ref = reference_run(env, prompt, [("fa", 1, 1), ("fb", 1, 1)], cfg_scale=3.0, negative_prompt="fog",
                        recenter=0.7)
    _assert_same(_latents(out), ref)
    assert "re-centring not applied" not in out.infotexts[0]
    from backend.sampling import sampling_function

    assert any(call["cond_or_uncond"] == [1, 0] for call in sampling_function.CALLS)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_split_calls_and_max_rows_give_the_same_result(monkeypatch, tmp_path, kind):
    env = make_env(monkeypatch, tmp_path, kind=kind)
    _unet_lora(env, "a", ["attn2", "proj_out"], 9)
    _unet_lora(env, "b", ["attn1", "time_embed"], 10)
    _unet_lora(env, "c", ["ff.net", "input_blocks.0.0"], 11)
    prompt = "a boat <lora:a> <lora:b> <lora:c:0.5>"
    from backend import memory_management
    from backend.sampling import sampling_function

    _, one = env.run(prompt, {}, batch_size=2, negative_prompt="rain")
    calls_one = list(sampling_function.CALLS)
    assert any(c["cond_or_uncond"] == [1, 0] for c in calls_one)
    sampling_function.CALLS.clear()
    # little free memory: Forge runs uncond and cond apart, branches go one model call each
    model = env.engine.forge_objects.unet.model
    memory_management.FREE_MEMORY = model.memory_required([3, 4, 4, 4])
    _, split = env.run(prompt, {}, batch_size=2, negative_prompt="rain")
    calls_split = list(sampling_function.CALLS)
    assert [1, 0] not in [c["cond_or_uncond"] for c in calls_split]
    assert max(c["rows"] for c in calls_split) == 2
    _assert_same(_latents(split), _latents(one), atol=1e-5)
    memory_management.FREE_MEMORY = float(1 << 40)
    sampling_function.CALLS.clear()
    _, limited = env.run(prompt, {"max_rows_per_call": 4}, batch_size=2, negative_prompt="rain")
    branch_rows = [c["rows"] for c in sampling_function.CALLS if c["rows"] != 4 or c["cond_or_uncond"] == [0]]
    assert max(branch_rows) <= 4
    _assert_same(_latents(limited), _latents(one), atol=1e-5)


def test_and_prompt_and_heun(monkeypatch, tmp_path):
    env = make_env(monkeypatch, tmp_path)
    env.write("a", {**env.unet_layers(include=["attn2"]), **env.te_layers()}, seed=12)
    env.write("b", env.unet_layers(include=["proj_in", "attn1"]), seed=13)
    prompt = "a cat AND a dog :0.6 <lora:a> <lora:b:0.9>"
    _, out = env.run(prompt, {"recenter": 0.4}, sampler_name="Heun", negative_prompt="bad", steps=3)
    ref = reference_run(env, prompt, [("a", 1, 1), ("b", 0.9, 0.9)], sampler="Heun", negative_prompt="bad",
                        recenter=0.4, steps=3)
    _assert_same(_latents(out), ref)
    from backend.sampling import sampling_function

    # both AND parts of the two branches ran in one model call: two chunks of 2 branch rows
    assert any(c["cond_or_uncond"] == [0, 0] and c["rows"] == 4 for c in sampling_function.CALLS)


def test_top_k_and_temperature_follow_the_settings(monkeypatch, tmp_path):
    env = make_env(monkeypatch, tmp_path)
    for i, inc in enumerate((["attn2"], ["attn1"], ["proj_in", "out.2"])):
        _unet_lora(env, f"l{i}", inc, 20 + i, std=0.5)
    prompt = "a tree <lora:l0> <lora:l1> <lora:l2>"
    _, out = env.run(prompt, {"top_k": 1, "temperature_scale": 4.0, "patch_size": 1, "recenter": 0.0})
    ref = reference_run(env, prompt, [(f"l{i}", 1, 1) for i in range(3)], top_k=1, temperature_scale=4.0,
                        patch_size=1, recenter=0.0)
    _assert_same(_latents(out), ref)


def test_merge_into_base_stays_with_the_builtin_lora(monkeypatch, tmp_path):
    env = make_env(monkeypatch, tmp_path)
    _unet_lora(env, "style", ["ff.net", "out.2"], 30)
    _unet_lora(env, "a", ["attn2"], 31)
    _unet_lora(env, "b", ["attn1"], 32)
    prompt = "a road <lora:style:0.8> <lora:a> <lora:b>"
    import networks

    p, out = env.run(prompt, {"merge_into_base": ["style"]})
    # the built-in was activated again with only the merged LoRA, and the composed tags left the
    # extra-network data (the conditioning cache key) so no later generation reuses conds made without them
    assert networks.LOADS[-1][0] == ["style"]
    assert [e.items[0] for e in p.extra_network_data["lora"]] == ["style"]
    ref = reference_run(env, prompt, [("a", 1, 1), ("b", 1, 1)], merged=[("style", 0.8, 0.8)])
    _assert_same(_latents(out), ref)
    assert all(n in out.infotexts[0] for n in ("style:", "a:", "b:"))  # Lora hashes of every LoRA


def test_controlnet_and_other_wrappers_apply_to_the_branches(monkeypatch, tmp_path):
    env = make_env(monkeypatch, tmp_path)
    _unet_lora(env, "a", ["attn2", "proj_in"], 40)
    _unet_lora(env, "b", ["attn1"], 41)

    class Control:
        """A ControlNet-like patch: one residual from a hint, broadcast to the call's rows."""

        previous_controlnet = None

        def __init__(self, hint):
            self.hint, self.rows = hint, []

        def get_control(self, x, t, cond, batched_number):
            self.rows.append(x.shape[0])
            return {"middle": [self.hint.repeat(x.shape[0] // self.hint.shape[0], 1, 1, 1) * 0.3]}

    hint = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(1))
    control = Control(hint)
    seen = []

    def wrapper(apply_model, params):  # another extension's model-function wrapper
        seen.append(params["input"].shape[0])
        return apply_model(params["input"], params["timestep"], **params["c"])

    original = env.engine.forge_objects_original.unet
    patched = original.clone()
    patched.add_patched_controlnet(control)
    patched.set_model_unet_function_wrapper(wrapper)
    env.engine.forge_objects_original.unet = patched
    env.engine.forge_objects_after_applying_lora.unet = patched
    prompt = "a bridge <lora:a> <lora:b>"
    _, out = env.run(prompt, {}, negative_prompt="x")
    ref = reference_run(env, prompt, [("a", 1, 1), ("b", 1, 1)], negative_prompt="x", control=control)
    _assert_same(_latents(out), ref)
    assert 2 in seen[:3] and any(n == 2 for n in seen)  # base [u, c] and the 2-branch calls went through it
    # per step: base, branch cond, branch uncond, and the default method's merged row (cond, uncond)
    assert len(seen) == 3 * 5 and seen[3:5] == [1, 1]
    assert env.hooks() == 0


def test_sdxl_both_text_encoders_per_branch(monkeypatch, tmp_path):
    env = make_env(monkeypatch, tmp_path, kind="sdxl")
    env.write("a", {**env.unet_layers(include=["attn2", "label_emb"]), **env.te_layers("clip_l", prefix="lora_te1_"),
                    **env.te_layers("clip_g", prefix="lora_te2_")}, seed=50)
    env.write("b", {**env.unet_layers(include=["attn1"]), **env.te_layers("clip_g", prefix="lora_te2_")}, seed=51)
    prompt = "a city <lora:a:1.1> <lora:b>"
    _, out = env.run(prompt, {}, negative_prompt="dark")
    ref = reference_run(env, prompt, [("a", 1.1, 1.1), ("b", 1, 1)], negative_prompt="dark")
    _assert_same(_latents(out), ref)


def test_image_conditioning_is_tiled_for_the_branches(monkeypatch, tmp_path):
    """An inpainting-style model: extra input channels from an image condition (``c_concat``)."""
    env = make_env(monkeypatch, tmp_path, in_channels=9)
    _unet_lora(env, "a", ["attn2", "input_blocks.0.0"], 60)
    _unet_lora(env, "b", ["proj_out"], 61)
    concat = torch.randn(2, 5, 4, 4, generator=torch.Generator().manual_seed(3))
    for patcher in (env.engine.forge_objects_original.unet,):
        patcher.extra_concat_condition = concat
    prompt = "a door <lora:a> <lora:b:0.6>"
    _, out = env.run(prompt, {}, batch_size=2, negative_prompt="n")
    ref = reference_run(env, prompt, [("a", 1, 1), ("b", 0.6, 0.6)], batch_size=2, negative_prompt="n",
                        concat=concat)
    _assert_same(_latents(out), ref)


# -- one model call per composed step ------------------------------------------------------------------


def _calls_per_evaluation(env, monkeypatch, prompt, settings, **kw):
    """Model calls per denoiser evaluation of one generation (Forge's own call counts as one)."""
    from modules import sd_samplers_cfg_denoiser as cfg_denoiser

    evaluations = []
    original = cfg_denoiser.sampling_function

    def counted(*args, **kwargs):
        evaluations.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(cfg_denoiser, "sampling_function", counted)
    model = env.engine.forge_objects.unet.model
    before = model.calls
    _, out = env.run(prompt, settings, **kw)
    monkeypatch.setattr(cfg_denoiser, "sampling_function", original)
    return (model.calls - before) / len(evaluations), out


@pytest.mark.parametrize("case", ["sd15", "sdxl", "heun", "hires", "lambda0", "flux_cfg1", "flux_cfg3"])
def test_one_model_call_per_composed_step(monkeypatch, tmp_path, case):
    """The branch rows ride in Forge's own call: one model call per composed evaluation, equal to the reference."""
    kind = "flux" if case.startswith("flux") else "sdxl" if case == "sdxl" else "sd15"
    env = make_env(monkeypatch, tmp_path, kind=kind)
    if kind == "flux":
        env.write("a", env.unet_layers(include=["img_attn", "single_blocks.0.linear1"]), seed=7)
        env.write("b", {**env.unet_layers(include=["txt_attn", "img_mlp.0"]),
                        **env.te_layers("clip_l", prefix="lora_te1_")}, seed=8)
    else:
        env.write("a", {**env.unet_layers(include=["attn2", "proj_in"]), **env.te_layers()}, seed=21)
        env.write("b", env.unet_layers(include=["attn1", "ff.net"]), seed=22, rank=3)
    prompt = "a tower <lora:a:0.9> <lora:b>"
    kw = {"negative_prompt": "fog", "batch_size": 2}
    ref_kw = dict(kw)
    settings = {"recenter": 1.0}
    if case == "heun":
        kw["sampler_name"] = ref_kw["sampler"] = "Heun"
    elif case == "lambda0":
        settings, ref_kw["recenter"] = {"recenter": 0.0}, 0.0
    elif case == "flux_cfg1":
        kw["cfg_scale"] = ref_kw["cfg_scale"] = 1.0
    elif case == "flux_cfg3":
        kw["cfg_scale"] = ref_kw["cfg_scale"] = 3.0
    if case == "hires":
        kw.update(enable_hr=True, hr_second_pass_steps=2)
    w0 = env.weights()
    per_eval, out = _calls_per_evaluation(env, monkeypatch, prompt, settings, **kw)
    assert per_eval == 1
    assert env.hooks() == 0
    w1 = env.weights()
    assert all(torch.equal(w0[k], w1[k]) for k in w0)
    if case != "hires":
        ref = reference_run(env, prompt, [("a", 0.9, 0.9), ("b", 1.0, 1.0)], **ref_kw)
        _assert_same(_latents(out), ref)


def test_host_features_that_keep_the_branch_call_apart_on_forge(monkeypatch, tmp_path):
    """AND prompts and max-rows keep the branches' own call (see host_forge._fold_refusal), with the same result."""
    env = make_env(monkeypatch, tmp_path)
    _unet_lora(env, "a", ["attn2", "proj_in"], 31)
    _unet_lora(env, "b", ["attn1"], 32)
    prompt = "a tower <lora:a> <lora:b>"
    per_eval, one = _calls_per_evaluation(env, monkeypatch, prompt, {}, negative_prompt="fog")
    assert per_eval == 1
    per_eval, capped = _calls_per_evaluation(env, monkeypatch, prompt, {"max_rows_per_call": 2}, negative_prompt="fog")
    # Forge's call, then the branches' cond and uncond rows in calls of 2 rows, and the merged row's (cond, uncond)
    assert per_eval == 1 + 2 + 2
    _assert_same(_latents(capped), _latents(one))
    per_eval, _ = _calls_per_evaluation(env, monkeypatch, "a cat AND a dog <lora:a> <lora:b>", {},
                                        negative_prompt="fog")
    # Forge's call, the branches' cond call (both parts) and their uncond call, the merged row's two
    assert per_eval == 3 + 2


def test_the_longer_call_describes_its_chunks_to_patches(monkeypatch, tmp_path):
    """Patches that read ``transformer_options`` see the branch blocks as chunks of their kind, rows consistent."""
    env = make_env(monkeypatch, tmp_path)
    _unet_lora(env, "a", ["attn2"], 51)
    _unet_lora(env, "b", ["attn1"], 52)
    net = env.engine.forge_objects.unet.model.diffusion_model
    seen = []
    forward = type(net).forward

    def recording(self, x, timesteps, context=None, y=None, control=None, transformer_options=None, **kw):
        seen.append((x.shape[0], dict(transformer_options)))
        return forward(self, x, timesteps, context=context, y=y, control=control,
                       transformer_options=transformer_options, **kw)

    monkeypatch.setattr(type(net), "forward", recording)
    env.run("a tower <lora:a> <lora:b>", {}, negative_prompt="fog", batch_size=2, steps=2)
    assert len(seen) == 2
    for rows, options in seen:
        marks = options["cond_or_uncond"]
        # Forge's [u, c], then each branch's copy of both chunks and the merged row's (method joint)
        assert rows == 16 and marks == [1, 0] * 4
        per = rows // len(marks)
        assert options["cond_mark"].tolist() == [float(m) for m in marks for _ in range(per)]
        assert sorted(options["cond_indices"] + options["uncond_indices"]) == list(range(rows))
        assert all(marks[i // per] == 0 for i in options["cond_indices"])
