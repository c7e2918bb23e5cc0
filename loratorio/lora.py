"""Adapter weights for one module, as LoRA files store them.

The host adapter turns whatever its own loader produced into these pieces; the routing
runtime (``loratorio.routing``) applies them to module outputs without ever writing the
module's weights. An *adapter set* is ``dict[str, piece | list[piece]]``: module name ->
the piece(s) one LoRA applies to that module.

- :class:`LowRank`: LoRA / LoCon factors (optionally with a Tucker ``mid``).
- :class:`Dense`: a full weight delta, for types the host can only give as deltas
  (LoHa, LoKr, full/diff).
- :class:`OutputSlice`: a piece that produces only output features
  ``offset:offset+size`` of a packed projection (a fused qkv weight).

``scale`` is always the final factor (``alpha / rank * multiplier`` is the host's business).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch

__all__ = ["Dense", "LowRank", "OutputSlice", "all_finite", "check_fit", "delta_weight", "pieces", "scaled_set",
           "total_nbytes", "truncate_rank"]


def _tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value.detach()


class LowRank:
    """Low-rank factors: ``delta W = scale * up @ [mid] @ down``.

    Linear: ``down [r, in]``, ``up [out, r]``. Conv: ``down [r, in, kh, kw]``,
    ``up [out, r, 1, 1]``; with a Tucker ``mid [r, r, kh, kw]`` the down is 1x1 and the
    spatial kernel sits in ``mid``. Factors keep the dtype and device they were loaded with.
    """

    __slots__ = ("down", "mid", "scale", "up")

    def __init__(self, down: torch.Tensor, up: torch.Tensor, scale: float = 1.0, mid: torch.Tensor | None = None):
        down, up = _tensor("down", down), _tensor("up", up)
        if down.dim() not in (2, 4) or up.dim() != down.dim():
            raise ValueError(f"LowRank needs 2-D or 4-D down/up of the same rank, got down {list(down.shape)}, "
                             f"up {list(up.shape)}")
        rank = down.shape[0]
        if up.shape[1] != (mid.shape[0] if mid is not None else rank):
            raise ValueError(f"LowRank up {list(up.shape)} does not match down {list(down.shape)}")
        if up.dim() == 4 and tuple(up.shape[2:]) != (1, 1):
            raise ValueError(f"LowRank conv up must be [out, r, 1, 1], got {list(up.shape)}")
        if mid is not None:
            mid = _tensor("mid", mid)
            if mid.dim() != 4 or down.dim() != 4 or mid.shape[1] != rank or tuple(down.shape[2:]) != (1, 1):
                raise ValueError(f"Tucker mid must be [r, r, kh, kw] with a 1x1 down, got mid {list(mid.shape)}, "
                                 f"down {list(down.shape)}")
        self.down, self.up, self.mid, self.scale = down, up, mid, float(scale)

    @property
    def rank(self) -> int:
        return self.up.shape[1]

    @property
    def in_features(self) -> int:
        return self.down.shape[1]

    @property
    def out_features(self) -> int:
        return self.up.shape[0]

    @property
    def kernel_size(self) -> tuple[int, int]:
        """Spatial kernel of the delta ((1, 1) for linear factors)."""
        if self.mid is not None:
            return tuple(self.mid.shape[2:])
        return tuple(self.down.shape[2:]) if self.down.dim() == 4 else (1, 1)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.down, self.up, self.mid) if t is not None)

    def delta(self) -> torch.Tensor:
        """The full weight delta, float32: ``[out, in]`` (linear) or ``[out, in, kh, kw]``."""
        up = self.up.float().flatten(1)
        if self.mid is None:
            down = self.down.float()
            if down.dim() == 2:
                return self.scale * (up @ down)
            return self.scale * torch.einsum("or,rikl->oikl", up, down)
        core = torch.einsum("or,rskl->oskl", up, self.mid.float())
        return self.scale * torch.einsum("oskl,si->oikl", core, self.down.float().flatten(1))


class Dense:
    """A full weight delta ``scale * delta`` (``[out, in]`` or ``[out, in, kh, kw]``), optional bias delta."""

    __slots__ = ("bias", "delta_tensor", "scale")

    def __init__(self, delta: torch.Tensor, scale: float = 1.0, bias: torch.Tensor | None = None):
        delta = _tensor("delta", delta)
        if delta.dim() not in (2, 4):
            raise ValueError(f"Dense delta must be [out, in] or [out, in, kh, kw], got {list(delta.shape)}")
        if bias is not None:
            bias = _tensor("bias", bias)
            if bias.shape != (delta.shape[0],):
                raise ValueError(f"Dense bias must be [{delta.shape[0]}], got {list(bias.shape)}")
        self.delta_tensor, self.scale, self.bias = delta, float(scale), bias

    @property
    def in_features(self) -> int:
        return self.delta_tensor.shape[1]

    @property
    def out_features(self) -> int:
        return self.delta_tensor.shape[0]

    @property
    def kernel_size(self) -> tuple[int, int]:
        return tuple(self.delta_tensor.shape[2:]) if self.delta_tensor.dim() == 4 else (1, 1)

    @property
    def nbytes(self) -> int:
        n = self.delta_tensor.numel() * self.delta_tensor.element_size()
        return n + (self.bias.numel() * self.bias.element_size() if self.bias is not None else 0)

    def delta(self) -> torch.Tensor:
        return self.scale * self.delta_tensor.float()


class OutputSlice:
    """``inner`` produces ``size`` output features placed at ``offset:offset+size`` of the target.

    Packed projections (one weight holding q, k and v) get one slice per sub-projection
    a LoRA file targets; the other output features are left to the base.
    """

    __slots__ = ("inner", "offset", "size")

    def __init__(self, inner: LowRank | Dense, offset: int, size: int):
        if not isinstance(inner, (LowRank, Dense)):
            raise TypeError(f"OutputSlice wraps a LowRank or Dense piece, got {type(inner).__name__}")
        if offset < 0 or size < 1 or inner.out_features != size:
            raise ValueError(f"OutputSlice(offset={offset}, size={size}) does not fit a piece with "
                             f"{inner.out_features} output features")
        self.inner, self.offset, self.size = inner, int(offset), int(size)

    @property
    def nbytes(self) -> int:
        return self.inner.nbytes


Piece = LowRank | Dense | OutputSlice


def pieces(entry) -> list[Piece]:
    """Normalise an adapter-set value (one piece or a sequence of pieces) to a list."""
    items = list(entry) if isinstance(entry, Sequence) else [entry]
    for item in items:
        if not isinstance(item, (LowRank, Dense, OutputSlice)):
            raise TypeError(f"adapter pieces must be LowRank, Dense or OutputSlice, got {type(item).__name__}")
    return items


def total_nbytes(adapter_set) -> int:
    """Bytes held by the tensors of one adapter set as loaded."""
    return sum(p.nbytes for entry in adapter_set.values() for p in pieces(entry))


def _fit(delta: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Reshape a linear-shaped delta onto a 1x1 conv weight or the reverse."""
    if delta.shape == shape:
        return delta
    if delta.numel() == torch.Size(shape).numel() and delta.shape[:2] == tuple(shape[:2]):
        return delta.reshape(shape)
    raise ValueError(f"adapter delta of shape {list(delta.shape)} does not fit a weight of shape {list(shape)}")


def delta_weight(entry, weight_shape) -> torch.Tensor:
    """Full float32 delta that merging ``entry`` (piece or list of pieces) into a weight of ``weight_shape`` adds.

    Used for merge references in tests and benchmarks, and for short-lived merges of
    packed parameters that output hooks cannot reach (restored bit-exactly by the caller).
    """
    shape = torch.Size(weight_shape)
    items = pieces(entry)
    first = items[0].inner if items and isinstance(items[0], OutputSlice) else (items[0] if items else None)
    device = (first.down if isinstance(first, LowRank) else first.delta_tensor).device if first is not None else None
    total = torch.zeros(shape, dtype=torch.float32, device=device)
    for piece in items:
        if isinstance(piece, OutputSlice):
            sub = _fit(piece.inner.delta(), torch.Size((piece.size, *shape[1:])))
            total[piece.offset:piece.offset + piece.size] += sub
        else:
            total += _fit(piece.delta(), shape)
    return total


# -- operations on adapter sets --------------------------------------------------------------


def _tensors(piece) -> list[torch.Tensor]:
    if isinstance(piece, OutputSlice):
        return _tensors(piece.inner)
    if isinstance(piece, LowRank):
        return [t for t in (piece.down, piece.up, piece.mid) if t is not None]
    return [t for t in (piece.delta_tensor, piece.bias) if t is not None]


def all_finite(*adapter_sets: Mapping) -> bool:
    """Whether every tensor of every piece in ``adapter_sets`` is finite (no NaN or infinity)."""
    for adapter_set in adapter_sets:
        for entry in adapter_set.values():
            for piece in pieces(entry):
                if not all(torch.isfinite(t).all() for t in _tensors(piece)):
                    return False
    return True


def _scaled_piece(piece, factor: float):
    if isinstance(piece, OutputSlice):
        return OutputSlice(_scaled_piece(piece.inner, factor), piece.offset, piece.size)
    out = copy.copy(piece)  # shares the tensors; only the scalar changes
    out.scale = piece.scale * factor
    if isinstance(out, Dense) and out.bias is not None:
        # Dense has no separate bias scale; the bias delta follows the multiplier too
        out.bias = out.bias * factor
    return out


def scaled_set(adapter_set: Mapping, factor: float) -> dict:
    """The adapter set with every piece's ``scale`` multiplied by ``factor`` (tensors shared)."""
    out = {}
    for name, entry in adapter_set.items():
        items = [_scaled_piece(p, factor) for p in pieces(entry)]
        out[name] = items[0] if len(items) == 1 else items
    return out


def truncate_rank(adapter_set: Mapping, rank: int | None) -> dict:
    """Keep the first ``rank`` components of low-rank pieces (the tag's ``dyn`` value).

    The scale is left as loaded (alpha over the file's rank), as the WebUI's own loader
    does. Tucker and dense pieces are kept whole.
    """
    if not rank:
        return dict(adapter_set)

    def cut(piece):
        if isinstance(piece, OutputSlice):
            return OutputSlice(cut(piece.inner), piece.offset, piece.size)
        if isinstance(piece, LowRank) and piece.mid is None and piece.rank > rank:
            return LowRank(piece.down[:rank], piece.up[:, :rank], piece.scale)
        return piece

    out = {}
    for name, entry in adapter_set.items():
        items = [cut(p) for p in pieces(entry)]
        out[name] = items[0] if len(items) == 1 else items
    return out


def _weight_shape(module, packed: bool) -> tuple[int, ...] | None:
    if packed and getattr(module, "in_proj_weight", None) is not None:
        weight = module.in_proj_weight
    else:
        weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    # 4-bit quantised weights (bitsandbytes NF4/FP4) store packed bytes; the logical
    # shape is kept on their quant state.
    logical = getattr(getattr(weight, "quant_state", None), "shape", None)
    return tuple(logical) if logical is not None else tuple(weight.shape)


def _piece_fit(piece, shape: tuple[int, ...]) -> str | None:
    out_f, in_f, kernel = shape[0], shape[1], tuple(shape[2:]) or (1, 1)
    if isinstance(piece, OutputSlice):
        if piece.offset + piece.size > out_f:
            return f"output slice {piece.offset}:{piece.offset + piece.size} beyond {out_f} features"
        piece, out_f = piece.inner, piece.size
    if piece.out_features != out_f or piece.in_features != in_f:
        return f"[{piece.out_features}, {piece.in_features}] for a [{out_f}, {in_f}] layer"
    if tuple(piece.kernel_size) != kernel:
        return f"kernel {tuple(piece.kernel_size)} for a {kernel} layer"
    return None


def check_fit(adapter_set: Mapping, targets: Mapping[str, torch.nn.Module], packed: bool = False) -> str | None:
    """Why ``adapter_set`` cannot apply to ``targets`` (first problem found), or None when it fits.

    ``packed``: the pieces merge into a packed projection (``in_proj_weight`` when the
    module has one) instead of being routed.
    """
    for name, entry in adapter_set.items():
        module = targets.get(name)
        if module is None:
            return f"layer {name} not in this model"
        shape = _weight_shape(module, packed)
        if shape is None or len(shape) not in (2, 4):
            return f"layer {name} has no linear or convolution weight"
        for piece in pieces(entry):
            problem = _piece_fit(piece, shape)
            if problem:
                return f"layer {name}: {problem}"
    return None
