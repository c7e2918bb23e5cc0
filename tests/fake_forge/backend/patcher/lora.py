"""Fake of Forge's LoRA loader (``backend/patcher/lora.py`` over
``packages_3rdparty/comfyui_lora_collection/lora.py``).

Output format, as Forge's: ``load_lora(sd, key_map) -> (patches, remaining)`` with
``patches[model_key] = (kind, tensors)``:

- ``("lora", (up, down, alpha, mid, dora_scale))`` for kohya ``lora_up/lora_down``
  (``lora_mid`` for Tucker LoCon) and PEFT ``lora_B/lora_A``;
- ``("loha", (w1a, w1b, alpha, w2a, w2b, t1, t2, dora_scale))``;
- ``("lokr", (w1, w2, alpha, w1a, w1b, w2a, w2b, t2, dora_scale))``;
- ``("diff", (w,))`` and ``("set", (w,))``.

A model key is a parameter name (``diffusion_model.<...>.weight``,
``clip_l.transformer.<...>.weight``) or, for a LoRA layer that covers part of a packed
weight (diffusers Flux ``to_q``/``to_k``/``to_v``/``proj_mlp``), a tuple
``(parameter name, (dim, offset, size))``.

``merge_lora_to_weight`` is the merge the tests compare against (an independent
implementation of the same arithmetic: ``strength * alpha / rank * up @ down``,
LoHa ``(w1a @ w1b) * (w2a @ w2b)``, LoKr ``kron(w1, w2)``, DoRA re-normalisation).
"""

from __future__ import annotations

import torch

from .. import utils


def _flux_diffusers_map(diffusion_model, prefix="diffusion_model."):
    cfg = diffusion_model.config
    h, mlp = cfg["hidden_size"], cfg["mlp_hidden"]
    out = {}
    for i in range(cfg["depth"]):
        d = f"transformer.transformer_blocks.{i}."
        b = f"{prefix}double_blocks.{i}."
        for j, name in enumerate(("to_q", "to_k", "to_v")):
            out[f"{d}attn.{name}"] = (f"{b}img_attn.qkv.weight", (0, j * h, h))
        for j, name in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
            out[f"{d}attn.{name}"] = (f"{b}txt_attn.qkv.weight", (0, j * h, h))
        out[f"{d}attn.to_out.0"] = f"{b}img_attn.proj.weight"
        out[f"{d}attn.to_add_out"] = f"{b}txt_attn.proj.weight"
        out[f"{d}ff.net.0.proj"] = f"{b}img_mlp.0.weight"
        out[f"{d}ff.net.2"] = f"{b}img_mlp.2.weight"
        out[f"{d}ff_context.net.0.proj"] = f"{b}txt_mlp.0.weight"
        out[f"{d}ff_context.net.2"] = f"{b}txt_mlp.2.weight"
    for i in range(cfg["depth_single"]):
        d = f"transformer.single_transformer_blocks.{i}."
        b = f"{prefix}single_blocks.{i}."
        for j, name in enumerate(("to_q", "to_k", "to_v")):
            out[f"{d}attn.{name}"] = (f"{b}linear1.weight", (0, j * h, h))
        out[f"{d}proj_mlp"] = (f"{b}linear1.weight", (0, 3 * h, mlp))
        out[f"{d}proj_out"] = f"{b}linear2.weight"
    return out


def model_lora_keys_unet(model, key_map={}):  # noqa: B006 - Forge's signature has this mutable default
    for k in model.state_dict():
        if not k.startswith("diffusion_model."):
            continue
        if k.endswith(".weight"):
            inner = k[len("diffusion_model."):-len(".weight")]
            key_map["lora_unet_" + inner.replace(".", "_")] = k
            key_map[k[:-len(".weight")]] = k
        else:
            key_map[k] = k
    if "flux" in model.config.huggingface_repo.lower():
        key_map.update(_flux_diffusers_map(model.diffusion_model))
    return key_map


def model_lora_keys_clip(model, key_map={}):  # noqa: B006
    keys = model.state_dict().keys()
    has_l = any(k.startswith("clip_l.") for k in keys)
    for k in keys:
        if not k.endswith(".weight"):
            continue
        g_prefixes = ("lora_te2_",) if has_l else ("lora_te_",)
        for enc, prefixes in (("clip_l", ("lora_te_", "lora_te1_")), ("clip_g", g_prefixes)):
            head = f"{enc}.transformer.text_model.encoder.layers."
            if k.startswith(head):
                rest = k[len(head):-len(".weight")]
                for p in prefixes:
                    key_map[f"{p}text_model_encoder_layers_{rest.replace('.', '_')}"] = k
        if k.startswith("t5xxl.transformer."):
            inner = k[len("t5xxl.transformer."):-len(".weight")].replace(".", "_")
            for p in ("te1", "te2", "te3"):
                key_map[f"lora_{p}_{inner}"] = k
    return key_map


def load_lora(lora, to_load):
    patches, used = {}, set()

    def take(name):
        used.add(name)
        return lora[name]

    for x, target in to_load.items():
        alpha = take(f"{x}.alpha").item() if f"{x}.alpha" in lora else None
        dora = take(f"{x}.dora_scale") if f"{x}.dora_scale" in lora else None
        for up, down in ((".lora_up.weight", ".lora_down.weight"), (".lora_B.weight", ".lora_A.weight")):
            if f"{x}{up}" in lora:
                mid = take(f"{x}.lora_mid.weight") if f"{x}.lora_mid.weight" in lora else None
                patches[target] = ("lora", (take(f"{x}{up}"), take(f"{x}{down}"), alpha, mid, dora))
                break
        if f"{x}.hada_w1_a" in lora:
            t1 = take(f"{x}.hada_t1") if f"{x}.hada_t1" in lora else None
            t2 = take(f"{x}.hada_t2") if f"{x}.hada_t2" in lora else None
            patches[target] = ("loha", (take(f"{x}.hada_w1_a"), take(f"{x}.hada_w1_b"), alpha,
                                        take(f"{x}.hada_w2_a"), take(f"{x}.hada_w2_b"), t1, t2, dora))
        lokr = {n: take(f"{x}.lokr_{n}") if f"{x}.lokr_{n}" in lora else None
                for n in ("w1", "w2", "w1_a", "w1_b", "w2_a", "w2_b", "t2")}
        if any(lokr[n] is not None for n in ("w1", "w2", "w1_a", "w2_a")):
            patches[target] = ("lokr", (lokr["w1"], lokr["w2"], alpha, lokr["w1_a"], lokr["w1_b"], lokr["w2_a"],
                                        lokr["w2_b"], lokr["t2"], dora))
        if f"{x}.diff" in lora:
            patches[target] = ("diff", (take(f"{x}.diff"),))
        if f"{x}.set_weight" in lora:
            patches[target] = ("set", (take(f"{x}.set_weight"),))
    remaining = {k: v for k, v in lora.items() if k not in used}
    return patches, remaining


def _dora(dora_scale, weight, diff, strength):
    calc = weight + diff
    if dora_scale.shape[0] == calc.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(-1, *[1] * (weight.dim() - 1))
    else:
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1).reshape(
            calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1)
    calc = calc * (dora_scale.to(calc) / (norm + torch.finfo(weight.dtype).eps))
    return weight + strength * (calc - weight)


def _diff(kind, v, weight):
    f = torch.float32
    if kind == "lora":
        up, down, alpha, mid, _ = v
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        up, down = up.to(f), down.to(f)
        if mid is not None:
            # Tucker: the spatial kernel sits in mid, down and up are 1x1
            core = torch.einsum("ir,rskl->iskl", up.flatten(1), mid.to(f))
            return scale * torch.einsum("oskl,si->oikl", core, down.flatten(1)).reshape(weight.shape)
        return scale * (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
    if kind == "loha":
        w1a, w1b, alpha, w2a, w2b, _t1, _t2, _ = v
        scale = alpha / w1b.shape[0] if alpha is not None else 1.0
        return scale * ((w1a.to(f) @ w1b.to(f)) * (w2a.to(f) @ w2b.to(f))).reshape(weight.shape)
    if kind == "lokr":
        w1, w2, alpha, w1a, w1b, w2a, w2b, _t2, _ = v
        dim = None
        if w1 is None:
            dim, w1 = w1b.shape[0], w1a.to(f) @ w1b.to(f)
        if w2 is None:
            dim, w2 = w2b.shape[0], w2a.to(f) @ w2b.to(f)
        w1, w2 = w1.to(f), w2.to(f)
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        scale = alpha / dim if alpha is not None and dim is not None else 1.0
        return scale * torch.kron(w1, w2).reshape(weight.shape)
    raise ValueError(kind)


@torch.inference_mode()
def merge_lora_to_weight(patches, weight, key="online_lora", computation_dtype=torch.float32):
    """``weight`` with ``patches`` (``[[strength, (kind, tensors), strength_model, offset, fn], ...]``) merged."""
    out_dtype = weight.dtype
    weight = weight.to(computation_dtype).clone()
    for strength, v, strength_model, offset, function in patches:
        full = weight
        if offset is not None:
            weight = weight.narrow(offset[0], offset[1], offset[2])
        if strength_model != 1.0:
            weight *= strength_model
        fn = function if function is not None else (lambda a: a)
        kind, tensors = v if len(v) == 2 else ("diff", v)
        if kind == "diff":
            weight += strength * tensors[0].to(weight)
        elif kind == "set":
            weight.copy_(tensors[0])
        else:
            diff = _diff(kind, tensors, weight)
            dora = tensors[4] if kind == "lora" else tensors[-1]
            if dora is not None:
                weight.copy_(_dora(dora, weight, fn(diff * 1.0), strength))
            else:
                weight += fn(strength * diff).to(weight.dtype)
        weight = full
    return weight.to(out_dtype)


class LoraLoader:
    """Merges patches into the shared weights and restores the originals (``lora.py:344-447``)."""

    def __init__(self, model):
        self.model = model
        self.backup = {}
        self.loaded_hash = str([])

    @torch.no_grad()
    def refresh(self, lora_patches, offload_device=None, force_refresh=False):
        hashes = str(list(lora_patches.keys()))
        if hashes == self.loaded_hash and not force_refresh:
            return
        for k, w in self.backup.items():
            utils.set_attr_raw(self.model, k, w)
        self.backup = {}
        merged = {}
        for patches in lora_patches.values():
            for key, items in patches.items():
                merged.setdefault(key, []).extend(items)
        for key, items in merged.items():
            _, _, weight = utils.get_attr_with_parent(self.model, key)
            self.backup.setdefault(key, weight)
            utils.set_attr_raw(self.model, key, torch.nn.Parameter(merge_lora_to_weight(items, weight, key),
                                                                   requires_grad=False))
        self.loaded_hash = hashes
