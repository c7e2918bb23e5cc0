"""Write kohya-format LoRA files for tests (deterministic, safetensors).

Key layout, as kohya's sd-scripts and the WebUIs read it::

    <layer>.lora_down.weight   [r, in] or [r, in, kh, kw]     (LoRA / LoCon)
    <layer>.lora_up.weight     [out, r] or [out, r, 1, 1]
    <layer>.alpha              scalar
    <layer>.hada_w1_a / hada_w1_b / hada_w2_a / hada_w2_b      (LoHa)

``<layer>`` is the kohya layer name, e.g. ``lora_unet_input_blocks_1_1_proj_in`` or
``lora_te_text_model_encoder_layers_0_self_attn_q_proj``.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

import torch
from safetensors.torch import save_file

__all__ = ["conv_and_linear_shapes", "lora_tensors", "write_lora", "write_raw"]


def conv_and_linear_shapes(model: torch.nn.Module, prefix: str, include: Iterable[str] | None = None,
                           exclude: Iterable[str] = ()) -> dict[str, tuple[int, ...]]:
    """``{prefix + dotted_name_with_underscores: weight shape}`` for the Linear/Conv2d modules of ``model``.

    ``include``: substrings of which a module name must contain one (all modules when None).
    """
    out = {}
    inc = list(include) if include is not None else None
    for name, module in model.named_modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        if inc is not None and not any(s in name for s in inc):
            continue
        if any(s in name for s in exclude):
            continue
        out[prefix + name.replace(".", "_")] = tuple(module.weight.shape)
    return out


def lora_tensors(shapes: Mapping[str, tuple[int, ...]], *, rank: int = 4, alpha: float | None = None,
                 seed: int = 0, std: float = 0.2, kind: str = "lora", dtype=torch.float32,
                 poison: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict of a LoRA for layers of the given weight shapes.

    ``kind``: ``"lora"`` (LoCon for 3x3 convs: the kernel sits in ``lora_down``) or
    ``"loha"``. ``alpha`` defaults to ``rank / 2`` so the alpha scaling is exercised.
    ``poison``: ``"nan"`` or ``"inf"`` puts one non-finite value in the first layer.
    """
    gen = torch.Generator().manual_seed(seed)
    alpha = float(rank) / 2 if alpha is None else float(alpha)
    sd: dict[str, torch.Tensor] = {}
    for layer, shape in sorted(shapes.items()):
        out_f, in_f = shape[0], shape[1]
        kernel = tuple(shape[2:])
        r = min(rank, out_f, in_f)
        if kind == "lora":
            down = torch.randn((r, in_f, *kernel), generator=gen) * std
            up = torch.randn((out_f, r, *((1, 1) if kernel else ())), generator=gen) * std
            sd[f"{layer}.lora_down.weight"] = down.to(dtype)
            sd[f"{layer}.lora_up.weight"] = up.to(dtype)
        elif kind == "loha":
            flat_in = in_f * (kernel[0] * kernel[1] if kernel else 1)
            for i in (1, 2):
                sd[f"{layer}.hada_w{i}_a"] = (torch.randn((out_f, r), generator=gen) * std).to(dtype)
                sd[f"{layer}.hada_w{i}_b"] = (torch.randn((r, flat_in), generator=gen) * std).to(dtype)
        else:
            raise ValueError(f"unknown LoRA kind {kind!r}")
        sd[f"{layer}.alpha"] = torch.tensor(alpha, dtype=dtype)
    if poison and sd:
        first = next(k for k in sd if not k.endswith(".alpha"))
        t = sd[first].clone()
        t.view(-1)[0] = float("nan") if poison == "nan" else float("inf")
        sd[first] = t
    return sd


def write_lora(path: str | os.PathLike, shapes: Mapping[str, tuple[int, ...]], **kwargs) -> dict[str, torch.Tensor]:
    """Write :func:`lora_tensors` to ``path`` (safetensors) and return the tensors."""
    metadata = kwargs.pop("metadata", None)
    sd = lora_tensors(shapes, **kwargs)
    write_raw(path, sd, metadata)
    return sd


def write_raw(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None):
    """Write any tensors as safetensors (for non-LoRA files and malformed LoRAs)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=dict(metadata or {}))
