"""Check ``loratorio.host_forge`` against Forge's real backend code (not the test fake).

Run in its own interpreter (``tests/test_forge_real_backend.py`` does) with a Forge
checkout first on ``sys.path``::

    python tests/fake_forge/real_check.py /path/to/stable-diffusion-webui-forge [extra site dir]

It builds tiny models from Forge's own classes (``IntegratedUNet2DConditionModel`` and
``IntegratedFluxTransformer2DModel`` under ``using_forge_operations``, so every Linear is
Forge's), loads LoRA state dicts through Forge's own key maps and ``load_lora``, and
compares:

1. every adapter piece with what Forge's ``merge_lora_to_weight`` adds to that weight
   (kohya LDM and diffusers names, LoCon, LoHa, DoRA, Flux packed q/k/v slices, text
   encoder keys);
2. one denoising step through Forge's ``sampling_function_inner`` with the LoRAtorio
   post-CFG function against ``compose`` on branch predictions of the model with each
   LoRA merged by Forge's own ``LoraLoader``, with cond/uncond in one call and split by
   low free memory, for SD (CFG 5) and Flux (CFG 1: no uncond pass).

Prints one JSON object per check: ``{"check": name, "max_abs": float, "scale": float}``.
``LORATORIO_CHECK_DEVICE=cuda`` runs the models on the GPU in fp16 (Forge's usual
setting); differences are then fp16 rounding.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
DEVICE = os.environ.get("LORATORIO_CHECK_DEVICE", "cpu")


def _setup(forge_dir: str, extra: list[str]) -> None:
    # Forge's backend reads its flags at import
    sys.argv = [sys.argv[0], "--always-cpu"] if DEVICE == "cpu" else [sys.argv[0]]
    # this file sits next to the fake's ``backend``: only the real one may be importable
    here = Path(__file__).resolve().parent
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != here]
    sys.path[:0] = [forge_dir, str(ROOT), str(ROOT / "tests")]
    sys.path.extend(extra)


def _dev():
    import torch

    return torch.device(DEVICE), (torch.float32 if DEVICE == "cpu" else torch.float16)


def _report(name, a, b):
    diff = (a.float() - b.float()).abs().max().item()
    print(json.dumps({"check": name, "max_abs": diff, "scale": b.float().abs().max().item()}), flush=True)


def _unet():
    import torch
    from backend import operations
    from backend.modules.k_model import KModel
    from backend.modules.k_prediction import Prediction
    from backend.nn.unet import IntegratedUNet2DConditionModel
    from backend.patcher.unet import UnetPatcher

    cfg = dict(in_channels=4, model_channels=32, out_channels=4, num_res_blocks=[1, 1], channel_mult=[1, 2],
               num_head_channels=16, use_spatial_transformer=True, transformer_depth=[1, 1],
               transformer_depth_output=[1, 1, 1, 1], context_dim=32, use_linear_in_transformer=False,
               transformer_depth_middle=1)
    torch.manual_seed(0)
    sd = {k: torch.randn_like(v) * 0.05 for k, v in IntegratedUNet2DConditionModel(**cfg).state_dict().items()}
    device, dtype = _dev()
    with operations.using_forge_operations(device=device, dtype=dtype):
        net = IntegratedUNet2DConditionModel(**cfg)
    net.load_state_dict(sd)
    net.to(device=device, dtype=dtype)  # layers Forge does not swap (norm scales) follow the model, as on load
    net.storage_dtype = net.computation_dtype = dtype
    model = KModel(net, None, k_predictor=Prediction(prediction_type="epsilon", beta_schedule="linear"),
                   config=SimpleNamespace(huggingface_repo="runwayml/stable-diffusion-v1-5"))
    return UnetPatcher(model, load_device=device, offload_device=device)


def _flux():
    import math

    import torch
    from backend import operations
    from backend.modules.k_model import KModel
    from backend.modules.k_prediction import PredictionFlux
    from backend.nn.flux import IntegratedFluxTransformer2DModel
    from backend.patcher.unet import UnetPatcher
    from diffusers import FlowMatchEulerDiscreteScheduler

    # Forge pins diffusers 0.31, whose time_shift reads no config; newer releases do
    FlowMatchEulerDiscreteScheduler.time_shift = (
        lambda self, mu, sigma, t: math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** sigma))
    cfg = dict(in_channels=16, vec_in_dim=24, context_in_dim=32, hidden_size=64, mlp_ratio=4.0, num_heads=2,
               depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12], theta=10000, qkv_bias=True, guidance_embed=True)
    torch.manual_seed(1)
    sd = {k: torch.randn_like(v) * 0.05 for k, v in IntegratedFluxTransformer2DModel(**cfg).state_dict().items()}
    device, dtype = _dev()
    with operations.using_forge_operations(device=device, dtype=dtype):
        net = IntegratedFluxTransformer2DModel(**cfg)
    net.load_state_dict(sd)
    net.to(device=device, dtype=dtype)  # layers Forge does not swap (norm scales) follow the model, as on load
    net.config = cfg  # as backend/loader.py:167 sets it
    net.storage_dtype = net.computation_dtype = dtype
    model = KModel(net, None, k_predictor=PredictionFlux(mu=1.0),
                   config=SimpleNamespace(huggingface_repo="black-forest-labs/FLUX.1-dev"))
    return UnetPatcher(model, load_device=device, offload_device=device)


def _text_encoders():
    import torch
    from backend.patcher.clip import JointTextEncoder
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(2)
    wrapper = torch.nn.Module()
    wrapper.transformer = CLIPTextModel(CLIPTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                                       num_attention_heads=2, vocab_size=100,
                                                       max_position_embeddings=16))
    return JointTextEncoder({"clip_l": wrapper})


def _forge_delta(root, key_patches, key):
    from backend.patcher.lora import merge_lora_to_weight
    from backend.utils import get_attr_with_parent

    _, _, w = get_attr_with_parent(root, key)
    return (merge_lora_to_weight(key_patches, w.detach().clone(), key) - w.detach()).float().cpu()


def _compare_loader(name, sd, patcher, te):
    import torch
    from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet

    from loratorio import host_forge_lora
    from loratorio.lora import delta_weight

    loaded = host_forge_lora.loaded_from_state_dict(sd, patcher.model, te)
    pu, rest = load_lora(dict(sd), model_lora_keys_unet(patcher.model, {}))
    pt, _ = load_lora(rest, model_lora_keys_clip(te, {}))
    worst = torch.zeros(())
    scale = torch.zeros(())
    count = 0
    for root, patches, adapters in ((patcher.model, pu, loaded.unet), (te, pt, loaded.te)):
        by_key = {}
        for k, v in patches.items():
            key, offset = (k, None) if isinstance(k, str) else (k[0], k[1])
            by_key.setdefault(key, []).append([1.0, v, 1.0, offset, None])
        assert set(by_key) == {m + ".weight" for m in adapters}, (name, sorted(by_key), sorted(adapters))
        for key, items in by_key.items():
            ref = _forge_delta(root, items, key)
            ours = delta_weight(adapters[key[: -len(".weight")]], ref.shape)
            worst = torch.maximum(worst, (ours - ref).abs().max())
            scale = torch.maximum(scale, ref.abs().max())
            count += 1
    assert count > 0, name
    print(json.dumps({"check": f"loader:{name}", "max_abs": worst.item(), "scale": scale.item(), "layers": count,
                      "kinds": sorted(loaded.kinds)}), flush=True)
    return loaded, pu


def loader_checks():
    import torch
    from backend.patcher.lora import model_lora_keys_unet
    from lora_files import lora_tensors

    patcher, te = _unet(), _text_encoders()
    unet_keys = model_lora_keys_unet(patcher.model, {})
    weights = dict(patcher.model.named_parameters())

    def shape(key):
        return tuple(weights[unet_keys[key]].shape)

    ldm = [k for k in unet_keys if k.startswith("lora_unet_input_blocks_1_1") or k == "lora_unet_input_blocks_0_0"]
    diffusers = [k for k in unet_keys if k.startswith("lora_unet_down_blocks_0_attentions_0")]
    te_keys = ["lora_te_text_model_encoder_layers_0_mlp_fc1", "lora_te_text_model_encoder_layers_0_self_attn_q_proj"]
    te_shapes = {"lora_te_text_model_encoder_layers_0_mlp_fc1": (64, 32),
                 "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (32, 32)}
    sd = lora_tensors({**{k: shape(k) for k in ldm if len(shape(k)) in (2, 4)},
                       **{te: te_shapes[te] for te in te_keys}}, rank=4, alpha=3.0, seed=1)
    _compare_loader("sd-kohya-ldm+te+locon", sd, patcher, te)
    sd = lora_tensors({k: shape(k) for k in diffusers if len(shape(k)) in (2, 4)}, rank=4, seed=2)
    _compare_loader("sd-kohya-diffusers", sd, patcher, te)
    sd = lora_tensors({k: shape(k) for k in ldm[:6] if len(shape(k)) in (2, 4)}, kind="loha", rank=3, seed=3)
    _compare_loader("sd-loha", sd, patcher, te)
    layer = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_q"
    sd = lora_tensors({layer: shape(layer)}, rank=2, seed=4)
    sd[layer + ".dora_scale"] = torch.rand(shape(layer)[0], 1) + 0.5
    _compare_loader("sd-dora", sd, patcher, te)

    flux = _flux()
    fkeys = model_lora_keys_unet(flux.model, {})
    tuple_keys = [k for k, v in fkeys.items() if not isinstance(v, str) and k.startswith("transformer.")]
    assert tuple_keys, "Forge's Flux key map has no packed (tuple) targets"
    fweights = dict(flux.model.named_parameters())

    def fshape(k):
        v = fkeys[k]
        if isinstance(v, str):
            return tuple(fweights[v].shape)
        return (v[1][2], fweights[v[0]].shape[1])

    chosen = [k for k in tuple_keys if any(s in k for s in ("to_q", "to_v", "proj_mlp", "add_k_proj"))]
    chosen += ["lora_unet_double_blocks_0_img_attn_proj", "lora_unet_single_blocks_0_linear2"]
    sd = lora_tensors({k: fshape(k) for k in chosen}, rank=4, seed=5)
    _compare_loader("flux-diffusers-packed+kohya", sd, flux, te)
    sd = lora_tensors({k: fshape(k) for k in tuple_keys if "to_k" in k}, kind="loha", rank=2, seed=6)
    _compare_loader("flux-loha-packed", sd, flux, te)
    return patcher, flux, te


def _branch(name, loaded, mult):
    from loratorio.loading import Branch, BranchSpec, LoraFile
    from loratorio.lora import scaled_set

    return Branch(spec=BranchSpec(name, mult, mult), file=LoraFile(name, name), unet=scaled_set(loaded.unet, mult),
                  te={}, te_merge={})


def step_check(name, patcher, te, sds, cond, uncond, x, sigma, cfg_scale, step=2, steps=4, free=None):
    """One step through Forge's sampling_function_inner with our post-CFG vs the merged-branch reference."""
    import torch
    from backend import memory_management
    from backend.patcher.lora import load_lora, model_lora_keys_unet
    from backend.sampling import sampling_function

    from loratorio import host_forge_lora, host_forge_step
    from loratorio.fusion import compose, method_options
    from loratorio.generation import GenerationState
    from loratorio.routing import Router
    from loratorio.settings import Settings

    mults = [1.0, 0.7]
    settings = Settings(enabled=True, recenter=0.5)
    state = GenerationState(settings)
    loaded = [host_forge_lora.loaded_from_state_dict(sd, patcher.model, te) for sd in sds]
    state.branches = [_branch(f"l{i}", ld, m) for i, (ld, m) in enumerate(zip(loaded, mults))]
    bridge = SimpleNamespace(unet_targets=lambda: host_forge_lora._weight_targets(patcher.model))
    state.extra["bridge"] = bridge
    state.router = Router(bridge.unet_targets(), [b.unet for b in state.branches])
    state.new_composer()
    p = SimpleNamespace(sampler=SimpleNamespace(model_wrap_cfg=SimpleNamespace(step=step, steps=steps,
                                                                                total_steps=steps)),
                        cfg_scale=cfg_scale)
    ctx = host_forge_step.PassContext(state=state, p=p)
    ctx.cond_scale = cfg_scale
    unet = patcher.clone()
    unet.set_model_sampler_post_cfg_function(host_forge_step.make_post_cfg(ctx))
    real_free = memory_management.get_free_memory
    if free is not None:
        def low(dev=None, torch_free_too=False):
            # only the batching decision sees little memory; attention keeps its real budget
            return real_free(dev, torch_free_too) if torch_free_too else free

        memory_management.get_free_memory = low
    try:
        with torch.no_grad():
            out = sampling_function.sampling_function_inner(patcher.model, x, sigma, uncond, cond, cfg_scale,
                                                            unet.model_options)
    finally:
        memory_management.get_free_memory = real_free
    assert state.error is None, state.error
    assert ctx.calls, "no routed branch call happened"

    with torch.no_grad():
        has_uncond = cfg_scale != 1
        cp, up = sampling_function.calc_cond_uncond_batch(patcher.model, cond, uncond if has_uncond else None, x,
                                                          sigma, {})
        lc, lu = [], []
        for sd, m in zip(sds, mults):
            patches, _ = load_lora(dict(sd), model_lora_keys_unet(patcher.model, {}))
            merged = patcher.clone()
            merged.add_patches(filename=str(id(sd)), patches=patches, strength_patch=m)
            merged.refresh_loras()  # Forge's LoraLoader merges into the shared weights
            c, u = sampling_function.calc_cond_uncond_batch(patcher.model, cond, uncond if has_uncond else None, x,
                                                            sigma, {})
            lc.append(c)
            lu.append(u)
            patcher.refresh_loras()  # and restores them
        res = compose(cp, torch.stack(lc), up if has_uncond else None, torch.stack(lu) if has_uncond else None,
                      step=step, x=x, recenter=0.5 if has_uncond else 0.0, **method_options(settings.method))
        u = res.uncond if has_uncond else up
        ref = u + (res.cond - u) * cfg_scale
    diff = (out - ref).abs().max().item()
    print(json.dumps({"check": f"step:{name}", "max_abs": diff, "scale": ref.abs().max().item(),
                      "branch_call_rows": sorted({rows for rows, _ in ctx.calls})}), flush=True)
    return out


def main():
    _setup(sys.argv[1], sys.argv[2:])
    import torch
    from backend.sampling.condition import Condition, ConditionCrossAttn
    from lora_files import lora_tensors

    patcher, flux, te = loader_checks()
    from backend.patcher.lora import model_lora_keys_unet

    keys = model_lora_keys_unet(patcher.model, {})
    w = dict(patcher.model.named_parameters())
    pick = [k for k in keys if k.startswith("lora_unet_input_blocks_1_1") and len(w[keys[k]].shape) in (2, 4)]
    sds = [lora_tensors({k: tuple(w[keys[k]].shape) for k in pick[:8]}, rank=4, seed=10, std=0.4),
           lora_tensors({k: tuple(w[keys[k]].shape) for k in pick[4:]}, rank=2, seed=11, std=0.4)]
    g = torch.Generator().manual_seed(3)
    device, _ = _dev()

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device)

    batch = 2
    x = rand(batch, 4, 8, 8) * 3
    sigma = torch.full((batch,), 3.0, device=device)
    cond = [{"model_conds": {"c_crossattn": ConditionCrossAttn(rand(batch, 7, 32))}, "strength": 1.0}]
    uncond = [{"model_conds": {"c_crossattn": ConditionCrossAttn(rand(batch, 7, 32))}}]
    one = step_check("sd-cfg5", patcher, te, sds, cond, uncond, x, sigma, 5.0)
    split = step_check("sd-cfg5-split", patcher, te, sds, cond, uncond, x, sigma, 5.0,
                       free=patcher.model.memory_required([3, 4, 8, 8]))
    _report("split-vs-one", split, one)

    fkeys = model_lora_keys_unet(flux.model, {})
    fw = dict(flux.model.named_parameters())

    def fshape(k):
        v = fkeys[k]
        return tuple(fw[v].shape) if isinstance(v, str) else (v[1][2], fw[v[0]].shape[1])

    fpick = [k for k, v in fkeys.items() if k.startswith("transformer.") and not isinstance(v, str)]
    fsds = [lora_tensors({k: fshape(k) for k in fpick if "to_q" in k or "proj_mlp" in k}, rank=4, seed=12, std=0.4),
            lora_tensors({k: fshape(k) for k in ("lora_unet_double_blocks_0_img_attn_qkv",
                                                 "lora_unet_single_blocks_0_linear2")}, rank=4, seed=13, std=0.4)]
    fx = rand(1, 16, 6, 10)
    fsigma = torch.full((1,), 0.6, device=device)
    guidance = torch.tensor([3.5], device=device)
    fcond = [{"model_conds": {"c_crossattn": ConditionCrossAttn(rand(1, 5, 32)), "y": Condition(rand(1, 24)),
                              "guidance": Condition(guidance)}, "strength": 1.0}]
    funcond = [{"model_conds": {"c_crossattn": ConditionCrossAttn(rand(1, 5, 32)), "y": Condition(rand(1, 24)),
                                "guidance": Condition(guidance)}}]
    step_check("flux-cfg1", flux, te, fsds, fcond, funcond, fx, fsigma, 1.0)
    step_check("flux-cfg3", flux, te, fsds, fcond, funcond, fx, fsigma, 3.0)


if __name__ == "__main__":
    main()
