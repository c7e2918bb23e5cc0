"""Forge LoRA weights -> adapters: every piece equals what Forge's own merge adds to the weight.

The main file types run through each fork's loader protocol too (``fake_forge.forks``).
"""

from __future__ import annotations

import pytest
import torch
from fake_forge.forks import FORKS
from fake_forge.harness import make_env

from loratorio.loading import LoraLoadError
from loratorio.lora import Dense, LowRank, OutputSlice, delta_weight, pieces


def _load(env, name):
    from backend.utils import load_torch_file

    from loratorio import host_forge_lora

    sd = load_torch_file(str(env.files[name]))
    return host_forge_lora.loaded_from_state_dict(sd, env.engine.forge_objects.unet.model, env.engine.text_encoders)


def _forge_delta(env, name, root_name, key):
    """What Forge's merge adds to parameter ``key`` for LoRA ``name`` at strength 1."""
    from backend.patcher.lora import load_lora, merge_lora_to_weight, model_lora_keys_clip, model_lora_keys_unet
    from backend.utils import get_attr_with_parent, load_torch_file

    sd = load_torch_file(str(env.files[name]))
    unet = env.engine.forge_objects.unet.model
    te = env.engine.text_encoders
    pu, rest = load_lora(sd, model_lora_keys_unet(unet, {}))
    pt, _ = load_lora(rest, model_lora_keys_clip(te, {}))
    root, patches = (unet, pu) if root_name == "unet" else (te, pt)
    items = []
    for k, v in patches.items():
        pkey, offset = (k, None) if isinstance(k, str) else (k[0], k[1])
        if pkey == key:
            items.append([1.0, v, 1.0, offset, None])
    _, _, w = get_attr_with_parent(root, key)
    return (merge_lora_to_weight(items, w.detach().clone(), key) - w).float()


def _check_all(env, name, loaded):
    checked = 0
    for root_name, adapter_set, root in (("unet", loaded.unet, env.engine.forge_objects.unet.model),
                                         ("te", loaded.te, env.engine.text_encoders)):
        for module_name, entry in adapter_set.items():
            w = dict(root.named_parameters())[module_name + ".weight"]
            ours = delta_weight(entry, w.shape)
            ref = _forge_delta(env, name, root_name, module_name + ".weight")
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
            checked += 1
    return checked


def test_forge_linear_is_not_torch_linear(monkeypatch, tmp_path):
    env = make_env(monkeypatch, tmp_path, with_script=False)
    from backend.operations import ForgeOperations

    net = env.engine.forge_objects.unet.model.diffusion_model
    linears = [m for m in net.modules() if isinstance(m, ForgeOperations.Linear)]
    assert linears and not any(isinstance(m, torch.nn.Linear) for m in linears)


@pytest.mark.parametrize("fork", ["forge", *FORKS])
def test_kohya_lora_and_locon_become_low_rank_equal_to_forge_merge(monkeypatch, tmp_path, fork):
    env = make_env(monkeypatch, tmp_path, with_script=False, fork=fork)
    shapes = {**env.unet_layers(), **env.te_layers()}
    env.write("style", shapes, rank=4, alpha=3.0, seed=1)
    loaded = _load(env, "style")
    assert loaded.kinds == {"lora"}
    assert loaded.unmatched == 0
    kinds = {type(p) for e in (*loaded.unet.values(), *loaded.te.values()) for p in pieces(e)}
    assert kinds == {LowRank}
    # 3x3 convolutions (LoCon) keep their kernel in the factors
    conv = loaded.unet["diffusion_model.input_blocks.0.0"]
    assert conv.down.shape[2:] == (3, 3) and conv.scale == pytest.approx(3.0 / 4)
    n = _check_all(env, "style", loaded)
    assert n == len(shapes)
    assert any(k.startswith("clip_l.transformer.text_model.encoder.layers.0.mlp.fc1") for k in loaded.te)


@pytest.mark.parametrize("fork", ["forge", *FORKS])
def test_loha_becomes_dense_delta_from_forge_merge(monkeypatch, tmp_path, fork):
    env = make_env(monkeypatch, tmp_path, with_script=False, fork=fork)
    shapes = env.unet_layers(include=["attn2.to_k", "proj_in", "out.2"])
    env.write("hada", shapes, kind="loha", rank=3, seed=2)
    loaded = _load(env, "hada")
    assert loaded.kinds == {"loha"}
    assert all(isinstance(e, Dense) for e in loaded.unet.values())
    assert _check_all(env, "hada", loaded) == len(shapes)


@pytest.mark.parametrize("fork", ["forge", *FORKS])
def test_dora_and_diff_patches(monkeypatch, tmp_path, fork):
    env = make_env(monkeypatch, tmp_path, with_script=False, fork=fork)
    from lora_files import lora_tensors

    net = env.engine.forge_objects.unet.model.diffusion_model
    sd = lora_tensors({"lora_unet_input_blocks_1_1_proj_out": (16, 16, 1, 1)}, rank=2, seed=3)
    sd["lora_unet_input_blocks_1_1_proj_out.dora_scale"] = torch.rand(16, 1, 1, 1) + 0.5
    w = net.input_blocks[1][1].transformer_blocks[0].attn2.to_v.weight
    sd["lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_v.diff"] = torch.randn_like(w) * 0.1
    env.write_raw("dora", sd)
    loaded = _load(env, "dora")
    assert isinstance(loaded.unet["diffusion_model.input_blocks.1.1.proj_out"], Dense)
    assert isinstance(loaded.unet["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v"], Dense)
    assert _check_all(env, "dora", loaded) == 2


def test_flux_packed_qkv_become_output_slices(monkeypatch, tmp_path):
    env = make_env(monkeypatch, tmp_path, kind="flux", with_script=False)
    hidden = env.engine.forge_objects.unet.model.diffusion_model.config["hidden_size"]
    mlp = env.engine.forge_objects.unet.model.diffusion_model.config["mlp_hidden"]
    d = "transformer.transformer_blocks.0.attn."
    s = "transformer.single_transformer_blocks.0."
    shapes = {d + "to_q": (hidden, hidden), d + "to_k": (hidden, hidden), d + "to_v": (hidden, hidden),
              d + "to_out.0": (hidden, hidden), s + "attn.to_q": (hidden, hidden), s + "attn.to_v": (hidden, hidden),
              s + "proj_mlp": (mlp, hidden),
              # kohya names of the BFL layers give whole-weight factors
              "lora_unet_double_blocks_0_txt_attn_qkv": (3 * hidden, hidden),
              **env.te_layers("t5xxl", include=["SelfAttention.q"])}
    env.write("fluxy", shapes, rank=4, seed=4)
    loaded = _load(env, "fluxy")
    qkv = pieces(loaded.unet["diffusion_model.double_blocks.0.img_attn.qkv"])
    assert sorted((p.offset, p.size) for p in qkv) == [(0, hidden), (hidden, hidden), (2 * hidden, hidden)]
    assert all(isinstance(p, OutputSlice) and isinstance(p.inner, LowRank) for p in qkv)
    lin1 = pieces(loaded.unet["diffusion_model.single_blocks.0.linear1"])
    assert sorted((p.offset, p.size) for p in lin1) == [(0, hidden), (2 * hidden, hidden), (3 * hidden, mlp)]
    assert isinstance(loaded.unet["diffusion_model.double_blocks.0.txt_attn.qkv"], LowRank)
    assert any(k.startswith("t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q") for k in loaded.te)
    assert _check_all(env, "fluxy", loaded) == 5  # img qkv, img proj, linear1, txt qkv, T5 q


def test_flux_packed_loha_slice_is_dense_output_slice(monkeypatch, tmp_path):
    env = make_env(monkeypatch, tmp_path, kind="flux", with_script=False)
    hidden = env.engine.forge_objects.unet.model.diffusion_model.config["hidden_size"]
    env.write("fluxhada", {"transformer.transformer_blocks.0.attn.to_k": (hidden, hidden)}, kind="loha", seed=5)
    loaded = _load(env, "fluxhada")
    piece = loaded.unet["diffusion_model.double_blocks.0.img_attn.qkv"]
    assert isinstance(piece, OutputSlice) and isinstance(piece.inner, Dense)
    assert (piece.offset, piece.size) == (hidden, hidden)
    assert _check_all(env, "fluxhada", loaded) == 1


@pytest.mark.parametrize("fork", ["forge", *FORKS])
def test_unmatched_layers_are_counted_and_non_lora_files_refused(monkeypatch, tmp_path, fork):
    env = make_env(monkeypatch, tmp_path, with_script=False, fork=fork)
    shapes = env.unet_layers(include=["attn2.to_q"])
    shapes["lora_unet_middle_block_1_proj_in"] = (16, 16)  # no such layer in this model
    shapes["lora_unet_output_blocks_3_0_skip"] = (8, 8)
    env.write("partial", shapes, seed=6)
    if fork == "neo":  # Neo's built-in refuses a file of which more than half the tensors match nothing
        with pytest.raises(LoraLoadError, match="6 of its 9 tensors match no layer"):
            _load(env, "partial")
    else:
        loaded = _load(env, "partial")
        assert loaded.unmatched == 2 and len(loaded.unet) == 1
    env.write_raw("checkpoint", {"model.diffusion_model.out.2.weight": torch.zeros(4, 16, 3, 3)})
    with pytest.raises(LoraLoadError, match="not a LoRA file"):
        _load(env, "checkpoint")
    # a file whose layers match but cannot run as branches says why
    env.write_raw("setter", {"lora_unet_out_2.set_weight": torch.zeros(4, 16, 3, 3)})
    with pytest.raises(LoraLoadError, match="'set' patch replaces the weight"):
        _load(env, "setter")


def test_weight_dependent_types_read_the_unpatched_weight(monkeypatch, tmp_path):
    """A DoRA delta is computed from Forge's backup when the built-in LoRA has merged into that layer."""
    env = make_env(monkeypatch, tmp_path, with_script=False)
    from lora_files import lora_tensors

    layer = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    sd = lora_tensors({layer: (16, 16)}, rank=2, seed=7)
    sd[layer + ".dora_scale"] = torch.rand(16, 1) + 0.5
    env.write_raw("dora2", sd)
    before = delta_weight(_load(env, "dora2").unet["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"],
                          (16, 16))
    env.write("other", {layer: (16, 16)}, seed=8)
    from backend.patcher.lora import load_lora, model_lora_keys_unet
    from backend.utils import load_torch_file

    unet = env.engine.forge_objects.unet
    patches, _ = load_lora(load_torch_file(str(env.files["other"])), model_lora_keys_unet(unet.model, {}))
    patched = unet.clone()
    patched.add_patches(filename="other", patches=patches, strength_patch=1.0)
    patched.refresh_loras()  # the built-in merged "other" into the shared weight
    after = delta_weight(_load(env, "dora2").unet["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"],
                         (16, 16))
    torch.testing.assert_close(after, before)
    unet.refresh_loras()


def test_quantized_weights_use_their_logical_shape(monkeypatch, tmp_path):
    """bitsandbytes 4-bit layers store packed bytes; low-rank factors still fit the real shape."""
    make_env(monkeypatch, tmp_path, with_script=False)
    from types import SimpleNamespace

    from loratorio import host_forge_backend, host_forge_lora

    layer = torch.nn.Module()
    packed = torch.nn.Parameter(torch.zeros(48 * 32 // 2, 1, dtype=torch.uint8), requires_grad=False)
    packed.quant_state = SimpleNamespace(shape=torch.Size([48, 32]))
    layer.weight = packed
    root = torch.nn.Module()
    root.proj = layer
    up, down = torch.randn(48, 4), torch.randn(4, 32)
    patches = {"proj.weight": ("lora", (up, down, 2.0, None, None)),
               "proj.bias": ("diff", (torch.randn(48),))}
    merge = host_forge_backend.detect().merge
    adapters, kinds, skipped = host_forge_lora.adapters_from_patches(patches, root, merge=merge)
    piece = adapters["proj"]
    assert kinds == {"lora"}
    assert isinstance(piece, LowRank) and piece.scale == 0.5
    torch.testing.assert_close(delta_weight(piece, (48, 32)), 0.5 * up @ down)
    assert skipped == [("proj.bias", "only weight patches are composed (bias/norm patch left out)")]
    dora = {"proj.weight": ("lora", (up, down, 2.0, None, torch.ones(48, 1)))}
    adapters, _, skipped = host_forge_lora.adapters_from_patches(dora, root, merge=merge)
    assert not adapters and "quantized" in skipped[0][1]
