"""The work of one routed module forward: jobs and their fused in-place paths.

A :class:`_Job` is one batched piece of a module's routing: ``m`` adapters of one group
of stacked factors on a block of rows. Where the form allows (low-rank linear, 1x1
low-rank conv, several adapters sharing the merged row) a fused path adds the deltas
straight into the module's output rows with one or two matmuls and keeps no copy of the
factors beyond what it says in ``extra``. Used by :mod:`loratorio.routing`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .routing_stacks import _Group

# Factors expanded to one matrix per row (1x1 convs) are kept with the schedule only for up to
# two rows per adapter (a B = 1 step's cond and uncond) and this many bytes: at most twice the
# factors. Larger batches expand per call instead (a transient copy).
_EXPAND_ROWS = 2
_EXPAND_LIMIT = 8 << 20
# On a CPU, a matmul into a rank this small (a few output columns) runs well below the
# machine's speed with torch's CPU BLAS; the rank product is then formed transposed,
# ``down @ x^T``, whose output is as wide as the rows (about half the time at ranks 2-8).
# From rank 16 on neither form wins everywhere. Measured side by side by
# ``python -m bench.rank_forms``.
_NARROW_RANK = 8


def _narrow_rank(t: torch.Tensor, rank: int) -> bool:
    """Whether the rank product is formed transposed (see ``_NARROW_RANK``)."""
    return t.device.type == "cpu" and rank <= _NARROW_RANK


def _takes_in_place(x: torch.Tensor, out: torch.Tensor, dtype: torch.dtype) -> bool:
    """Whether a fused path can add into ``out`` in place: input and output in the factors' dtype, output
    contiguous (its row blocks are then plain views)."""
    return out.dtype == dtype and x.dtype == dtype and out.is_contiguous()


class _Job:
    """One batched piece of work of a module forward: ``m`` adapters of ``group`` on ``rows``.

    ``fast(x, out)`` is set where the form has a fused in-place path (low-rank linear,
    1x1 low-rank conv): one matmul accumulating straight into the output rows when the
    factors' product is the cheaper form, else two. It returns False when the output
    cannot take the in-place update (another dtype, not contiguous); the general path
    then runs. ``extra``: tensors prepared for the fused path, counted in the router's size.
    """

    __slots__ = ("extra", "fast", "group", "m", "rows", "stacks")

    def __init__(self, group: _Group, rows: slice, m: int, stacks: dict[str, torch.Tensor]):
        self.group, self.rows, self.m, self.stacks = group, rows, m, stacks
        self.fast = None
        self.extra: tuple[torch.Tensor, ...] = ()  # tensors prepared for the fused path (expanded factors)


class _SharedJob(_Job):
    """``m`` adapters of ``group`` all on the same ``rows``: their deltas add up there."""

    __slots__ = ()


def _linear_shared(rows: slice, down_t: torch.Tensor, up_t: torch.Tensor):
    """``out[rows] += sum_i x[rows] @ down_i @ up_i``: one batched matmul into the ranks, one into the output.

    ``down_t [m, c, r]`` and ``up_t [m, r, o]`` are views of the group's stacks; the up
    factors read as one ``[m * r, o]`` matrix, so nothing is copied or kept.
    """
    m, c, r = down_t.shape
    o = up_t.shape[2]
    dtype = down_t.dtype
    up_flat = up_t.reshape(m * r, o)
    down = down_t.transpose(1, 2)  # [m, r, c], a view

    def run(x: torch.Tensor, out: torch.Tensor) -> bool:
        if not _takes_in_place(x, out, dtype):
            return False
        xr = x[rows].reshape(-1, c)
        # the ranks of all m adapters for every row, [m * r, n]: one matmul, read transposed by the next
        h = torch.matmul(down, xr.T).view(m * r, -1)
        out[rows].view(-1, o).addmm_(h.T, up_flat)
        return True

    return run


def _dense_is_cheaper(rank: int, c: int, o: int) -> bool:
    """Whether the product ``down @ up`` (``c x o`` per adapter) costs no more than the factors (``r (c + o)``).

    Then it is also no larger in memory, and one matmul replaces two (narrow layers, high ranks).
    """
    return c * o <= rank * (c + o)


def _linear_fast(rows: slice, m: int, down_t: torch.Tensor, up_t: torch.Tensor, products: dict | None = None,
                 key=None):
    """``out[rows] += x[rows] @ down @ up`` per adapter block, accumulated straight into the output rows.

    One bmm and one baddbmm_; or a single baddbmm_ with the factors' product when that
    is the cheaper form (:func:`_dense_is_cheaper`, product formed once in at least
    float32, kept in ``products[key]`` for other row layouts of the same adapters).
    Returns ``(run, tensors made here)``.
    """
    r, c, o = down_t.shape[2], down_t.shape[1], up_t.shape[2]
    dtype = down_t.dtype
    if _dense_is_cheaper(r, c, o):
        w = products.get(key) if products is not None else None
        if w is None:
            wide = torch.promote_types(dtype, torch.float32)
            w = torch.bmm(down_t.to(wide), up_t.to(wide)).to(dtype)  # [m, c, o]
            if products is not None:
                products[key] = w

        def run(x: torch.Tensor, out: torch.Tensor) -> bool:
            if not _takes_in_place(x, out, dtype):
                return False
            out[rows].view(m, -1, o).baddbmm_(x[rows].reshape(m, -1, c), w)
            return True

        return run, (w,)

    if _narrow_rank(down_t, r):
        down = down_t.transpose(1, 2)  # [m, r, c], a view

        def run_narrow(x: torch.Tensor, out: torch.Tensor) -> bool:
            if not _takes_in_place(x, out, dtype):
                return False
            h = torch.bmm(down, x[rows].reshape(m, -1, c).transpose(1, 2))  # [m, r, n]
            out[rows].view(m, -1, o).baddbmm_(h.transpose(1, 2), up_t)
            return True

        return run_narrow, ()

    def run_factors(x: torch.Tensor, out: torch.Tensor) -> bool:
        if not _takes_in_place(x, out, dtype):
            return False
        out[rows].view(m, -1, o).baddbmm_(torch.bmm(x[rows].reshape(m, -1, c), down_t), up_t)
        return True

    return run_factors, ()


def _pointwise_fast(rows: slice, m: int, down: torch.Tensor, up: torch.Tensor):
    """1x1 low-rank conv on ``[m * n, C, H, W]`` rows as channel matmuls accumulated into the output.

    The factors (or their product, where cheaper) are expanded to one matrix per row once
    here (few rows, see ``_EXPAND_ROWS``), so a forward is one or two bmm with no per-call
    copies of the factors.
    """
    n = (rows.stop - rows.start) // m
    r, c, o = down.shape[1], down.shape[2], up.shape[1]
    dtype = down.dtype
    keep = n <= _EXPAND_ROWS
    if _dense_is_cheaper(r, c, o) and keep and m * n * c * o * down.element_size() <= _EXPAND_LIMIT:
        wide = torch.promote_types(dtype, torch.float32)
        w = torch.bmm(up.reshape(m, o, r).to(wide), down.reshape(m, r, c).to(wide)).to(dtype)  # [m, o, c]
        w_e = w.reshape(m, 1, o, c).expand(m, n, o, c).reshape(m * n, o, c)

        def run_dense(x: torch.Tensor, out: torch.Tensor) -> bool:
            if not _takes_in_place(x, out, dtype):
                return False
            xr = x[rows]
            hw = xr.shape[2] * xr.shape[3]
            out[rows].view(m * n, o, hw).baddbmm_(w_e, xr.reshape(m * n, c, hw))
            return True

        return run_dense, (w_e,)
    if keep and m * n * r * max(c, o) * down.element_size() <= _EXPAND_LIMIT:
        down_e = down.reshape(m, 1, r, c).expand(m, n, r, c).reshape(m * n, r, c)
        up_e = up.reshape(m, 1, o, r).expand(m, n, o, r).reshape(m * n, o, r)
    else:
        down_e = up_e = None

    def run(x: torch.Tensor, out: torch.Tensor) -> bool:
        if not _takes_in_place(x, out, dtype):
            return False
        xr = x[rows]
        hw = xr.shape[2] * xr.shape[3]
        if down_e is not None:
            h = torch.bmm(down_e, xr.reshape(m * n, c, hw))
            out[rows].view(m * n, o, hw).baddbmm_(up_e, h)
        else:
            h = torch.matmul(down.reshape(m, 1, r, c), xr.reshape(m, n, c, hw)).reshape(m * n, r, hw)
            out[rows].view(m * n, o, hw).baddbmm_(up.reshape(m, 1, o, r).expand(m, n, o, r).reshape(m * n, o, r), h)
        return True

    return run, tuple(t for t in (down_e, up_e) if t is not None)


def _members(stacks: dict[str, torch.Tensor], positions: list[int], device) -> dict[str, torch.Tensor]:
    """The stacks of the members at ``positions``: views where they are consecutive, copies otherwise."""
    if positions == list(range(positions[0], positions[0] + len(positions))):
        return {k: v[positions[0]:positions[0] + len(positions)] for k, v in stacks.items()}
    index = torch.tensor(positions, dtype=torch.long).to(device, non_blocking=True)
    return {k: v.index_select(0, index) for k, v in stacks.items()}
