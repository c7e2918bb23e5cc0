"""A target module's adapters stacked by form, and the delta of a stack on a block of rows.

The adapters of one module that share a form (low-rank linear, low-rank conv, Tucker,
dense, same output slice) are stacked along a leading adapter dim, ranks zero-padded to
the largest, so :mod:`loratorio.routing` runs them as one batched matmul or one grouped
convolution. :func:`_group_delta` is the general path of every form (a new tensor in the
module's output layout); :mod:`loratorio.routing_jobs` holds the fused in-place ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .lora import Dense, LowRank


class RoutingError(RuntimeError):
    """Routing was asked for something it cannot do safely (nesting, unknown module, bad rows)."""



def _is_conv(module: nn.Module) -> bool:
    # Forge's and other hosts' layers need not subclass torch.nn.Conv2d/Linear; a conv
    # is recognised by its conv attributes, everything else is treated as linear.
    return isinstance(module, nn.Conv2d) or (hasattr(module, "kernel_size") and hasattr(module, "stride"))


def _pair(value) -> tuple[int, int]:
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


@dataclass
class _ConvGeometry:
    stride: tuple[int, int] = (1, 1)
    padding: tuple[int, int] | str = (0, 0)
    dilation: tuple[int, int] = (1, 1)
    kernel: tuple[int, int] | None = None

    @classmethod
    def of(cls, module: nn.Module) -> _ConvGeometry:
        if getattr(module, "groups", 1) != 1:
            raise RoutingError(f"grouped convolutions are not supported as LoRA targets ({type(module).__name__})")
        if getattr(module, "padding_mode", "zeros") != "zeros":
            raise RoutingError(f"padding mode {module.padding_mode!r} is not supported as a LoRA target")
        padding = module.padding if isinstance(module.padding, str) else _pair(module.padding)
        return cls(_pair(module.stride), padding, _pair(getattr(module, "dilation", 1)), _pair(module.kernel_size))


@dataclass
class _Group:
    """Pieces of one form on one module, stacked along a leading adapter dim ``M``."""

    form: str  # "lr_linear" | "lr_conv" | "tucker" | "dense_linear" | "dense_conv"
    out_slice: tuple[int, int] | None
    members: list[int]  # adapter index of each stacked entry
    stacks: dict[str, torch.Tensor]  # name -> [M, ...]
    cache: dict = field(default_factory=dict)

    def tensors(self, device, dtype) -> dict[str, torch.Tensor]:
        """The stacks on the compute device and dtype, holding at most one extra copy.

        A move to another device or a widening cast replaces the stacks (nothing is lost);
        a narrowing cast keeps the wider source and one narrow copy beside it.
        """
        source = next(iter(self.stacks.values()))
        if source.device == torch.device(device) and source.dtype == dtype:
            return self.stacks
        key = (torch.device(device), dtype)
        if key not in self.cache:
            converted = {k: v.to(device=device, dtype=dtype) for k, v in self.stacks.items()}
            if torch.promote_types(source.dtype, dtype) == dtype:
                self.stacks, self.cache = converted, {}
                return converted
            self.cache = {key: converted}
        return self.cache[key]

    @property
    def nbytes(self) -> int:
        seen, total = set(), 0
        for tensors in (self.stacks, *self.cache.values()):
            for t in tensors.values():
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
        return total


def _pad_rank(t: torch.Tensor, dim: int, rank: int) -> torch.Tensor:
    if t.shape[dim] == rank:
        return t
    pad = [0, 0] * (t.dim() - dim - 1) + [0, rank - t.shape[dim]]
    return F.pad(t, pad)


def _common_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    dtype = _common_dtype(tensors)
    return torch.stack([t.to(dtype=dtype, device=tensors[0].device) for t in tensors])


def _form(piece: LowRank | Dense, conv: bool) -> str:
    if isinstance(piece, Dense):
        return "dense_conv" if conv else "dense_linear"
    if piece.mid is not None:
        return "tucker"
    return "lr_conv" if conv else "lr_linear"


def _check_fit(name: str, piece: LowRank | Dense, conv: bool, geometry: _ConvGeometry | None) -> None:
    kernel = piece.kernel_size
    if conv:
        if geometry.kernel is not None and kernel != geometry.kernel:
            raise RoutingError(f"module {name!r}: adapter kernel {kernel} does not match the module's "
                               f"{geometry.kernel}")
    elif kernel != (1, 1):
        raise RoutingError(f"module {name!r} is linear but the adapter has a {kernel} kernel")


def _build_groups(name: str, entries: list[tuple[int, LowRank | Dense, tuple[int, int] | None]], conv: bool,
                  geometry: _ConvGeometry | None) -> list[_Group]:
    """Stack the pieces of one module by form; a second piece of the same adapter and form opens a new layer."""
    by_key: dict[tuple, list[list[tuple[int, LowRank | Dense]]]] = {}
    for j, piece, out_slice in entries:
        _check_fit(name, piece, conv, geometry)
        key = (_form(piece, conv), out_slice, piece.kernel_size, piece.in_features)
        layers = by_key.setdefault(key, [])
        for layer in layers:
            if all(m != j for m, _ in layer):
                layer.append((j, piece))
                break
        else:
            layers.append([(j, piece)])
    groups = []
    for (form, out_slice, _kernel, _in), layers in by_key.items():
        for layer in layers:
            groups.append(_Group(form, out_slice, [j for j, _ in layer], _stack_form(form, [p for _, p in layer])))
    return groups


def _stack_form(form: str, items: list[LowRank | Dense]) -> dict[str, torch.Tensor]:
    if form.startswith("dense"):
        shape = (items[0].out_features, items[0].in_features, *items[0].kernel_size)
        stacks = {"w": _stack([p.delta_tensor.reshape(shape) * p.scale for p in items])}
        if any(p.bias is not None for p in items):
            stacks["b"] = _stack([p.bias * p.scale if p.bias is not None else
                                  torch.zeros(p.out_features, dtype=p.delta_tensor.dtype) for p in items])
        if form == "dense_linear":
            stacks["w"] = stacks["w"].flatten(2).transpose(1, 2).contiguous()  # [M, in, out]
        return stacks
    rank = max(p.rank for p in items)
    if form == "lr_linear":
        down = _stack([_pad_rank(p.down.flatten(1), 0, rank) for p in items])  # [M, r, in]
        up = _stack([_pad_rank(p.up.flatten(1) * p.scale, 1, rank) for p in items])  # [M, out, r]
        return {"down_t": down.transpose(1, 2).contiguous(), "up_t": up.transpose(1, 2).contiguous()}
    if form == "lr_conv":
        down = _stack([_pad_rank(p.down.reshape(p.rank, p.in_features, *p.kernel_size), 0, rank) for p in items])
        up = _stack([_pad_rank(p.up.reshape(p.out_features, p.rank, 1, 1) * p.scale, 1, rank) for p in items])
        return {"down": down, "up": up}
    # Tucker: 1x1 down, spatial mid, 1x1 up
    down = _stack([_pad_rank(p.down.reshape(p.down.shape[0], p.in_features, 1, 1), 0, rank) for p in items])
    mid = _stack([_pad_rank(_pad_rank(p.mid, 0, rank), 1, rank) for p in items])
    up = _stack([_pad_rank(p.up.reshape(p.out_features, p.rank, 1, 1) * p.scale, 1, rank) for p in items])
    return {"down": down, "mid": mid, "up": up}


def _grouped_conv(x: torch.Tensor, weight: torch.Tensor, m: int, geometry: _ConvGeometry | None) -> torch.Tensor:
    """``x [L, M*cin, H, W]`` with ``weight [M, cout, cin, kh, kw]`` as one grouped convolution."""
    w = weight.reshape(-1, *weight.shape[2:])
    if geometry is None:
        return F.conv2d(x, w, groups=m)
    return F.conv2d(x, w, stride=geometry.stride, padding=geometry.padding, dilation=geometry.dilation, groups=m)


def _group_delta(group: _Group, t: dict[str, torch.Tensor], x: torch.Tensor, m: int,
                 geometry: _ConvGeometry | None) -> torch.Tensor:
    """Delta output for ``x`` holding ``m`` equal row blocks, block ``i`` for entry ``i`` of the stacks ``t``.

    Returns ``[m * L, ...]`` in the module's output layout (rows in the same order as ``x``).
    """
    rows = x.shape[0] // m
    if group.form in ("lr_linear", "dense_linear"):
        flat = x.reshape(m, -1, x.shape[-1])
        if group.form == "lr_linear":
            out = torch.bmm(torch.bmm(flat, t["down_t"]), t["up_t"])
        else:
            out = torch.bmm(flat, t["w"])
        if "b" in t:
            out = out + t["b"].unsqueeze(1)
        return out.reshape(*x.shape[:-1], out.shape[-1])
    # Convolutions: adapters become groups of one convolution over [L, M*C, H, W].
    xs = x if m == 1 else x.reshape(m, rows, *x.shape[1:]).transpose(0, 1).reshape(rows, -1, *x.shape[2:])
    if group.form == "lr_conv":
        h = _grouped_conv(xs, t["down"], m, geometry)
        out = _grouped_conv(h, t["up"], m, None)
    elif group.form == "tucker":
        h = _grouped_conv(xs, t["down"], m, None)
        h = _grouped_conv(h, t["mid"], m, geometry)
        out = _grouped_conv(h, t["up"], m, None)
    else:
        out = _grouped_conv(xs, t["w"], m, geometry)
    if "b" in t:
        out = out + t["b"].reshape(1, -1, 1, 1)
    if m == 1:
        return out
    return out.reshape(rows, m, -1, *out.shape[2:]).transpose(0, 1).reshape(m * rows, -1, *out.shape[2:])
