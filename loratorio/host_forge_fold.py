"""Forge adapter, the branch rows inside Forge's own model call (one call per step).

The conditioning modifier (:func:`make_scale_recorder`) runs before Forge batches cond and
uncond: where the branch rows can join Forge's call (:func:`_fold_refusal`), it hands Forge
``model_options`` with a model-function wrapper (:func:`_fold_wrapper`) that adds them to
that call: Forge's cond/uncond chunks, then per branch a copy of each chunk's rows with
the branch's own text, and the merged row's copies where the method uses it. The rows are
routed to their LoRAs inside that call only; Forge gets back its own rows, and the
post-CFG function (:mod:`loratorio.host_forge_step`) reads the branch outputs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from .generation import usable
from .host_forge_backend import Backend
from .host_forge_step import (
    _COND,
    _TEXT_CONDS,
    _UNCOND,
    MERGED,
    PassContext,
    _compile_step_texts,
    fail,
    pass_step,
)
from .routing import RoutingError

__all__ = ["make_scale_recorder"]


@dataclass
class _Fold:
    """Branch rows that ride in Forge's own model call of one denoiser evaluation.

    Prepared by the conditioning modifier (which runs before Forge batches cond and
    uncond), filled by the model-function wrapper when the call runs (``outputs[(j,
    kind)]``: branch ``j``'s x0 rows for that chunk kind), read by the post-CFG function.
    ``done`` holds the kinds already evaluated: a later call in the same step (another
    extension's post-CFG pass) runs plain.
    """

    step: int
    active: list[int]
    batch: int
    use_uncond: bool
    texts: dict
    merged: bool = False  # the call also carries the merged row (copies of each chunk with every LoRA at once)
    outputs: dict = field(default_factory=dict)
    done: set = field(default_factory=set)
    closed: bool = False
    error: BaseException | None = None


def make_scale_recorder(ctx: PassContext) -> Callable:
    """A conditioning modifier (``sampling_function.py:359-360``): records the CFG scale and prepares the step.

    It runs before Forge batches cond and uncond: where the branch rows can join Forge's
    own model call (:func:`_fold_refusal`), the ``model_options`` it returns carry a
    model-function wrapper that adds them to that call. Conds, x and scale are unchanged.
    """

    def record(model, x, timestep, uncond, cond, cond_scale, model_options, seed):
        ctx.cond_scale = float(cond_scale)
        ctx.fold = None
        if ctx.closed or not usable(ctx.state) or ctx.state.composer is None:
            return model, x, timestep, uncond, cond, cond_scale, model_options, seed
        try:
            model_options = _prepare_fold(ctx, model, x, uncond, cond, float(cond_scale), model_options)
        except Exception as exc:
            ctx.closed = True
            fail(ctx.p, ctx.state, exc, "preparing a step")
        return model, x, timestep, uncond, cond, cond_scale, model_options, seed

    return record


def _uncond_runs(opts: Mapping, uncond, cond_scale: float) -> bool:
    """Whether Forge evaluates the uncond rows (no CFG-1 optimisation, ``sampling_function.py:295-298``)."""
    return uncond is not None and not (math.isclose(cond_scale, 1.0)
                                       and not opts.get("disable_cfg1_optimization", False))


def _fold_refusal(ctx: PassContext, model, x: torch.Tensor, uncond, cond, opts: Mapping, rows: int) -> str | None:
    """Why the branch rows cannot join Forge's own model call at this step (None: they can).

    - another extension's ``model_function_wrapper`` (tiled diffusion, ...) may split or
      rearrange the call's rows, so the branch rows keep a call of their own through it;
    - a ControlNet computes its control from the call's rows before the model call
      (``sampling_function.py:261-268``), for the base rows only;
    - AND prompts: Forge's batch of several sub-prompt chunks does not say which chunk is
      which sub-prompt, so a branch's own text could not be matched to it; area or mask
      conds cover part of the latent;
    - the max-rows setting, or Forge's free-memory estimate, does not allow the larger call.
    """
    if "model_function_wrapper" in opts:
        return "another model-function wrapper"
    parts = list(cond) + list(uncond or [])
    if any(part.get("control") is not None for part in parts):
        return "ControlNet"
    if len(cond) != 1 or (uncond is not None and len(uncond) != 1):
        return "AND prompt"
    if any("area" in part or "mask" in part for part in parts):
        return "area conditioning"
    if ctx.max_rows > 0 and rows > ctx.max_rows:
        return "more rows than max_rows_per_call"
    estimate = getattr(model, "memory_required", None)
    if estimate is not None and estimate([rows, *x.shape[1:]]) >= ctx.backend.get_free_memory(x.device):
        return "not enough free memory"
    return None


def _prepare_fold(ctx: PassContext, model, x, uncond, cond, cond_scale: float, opts: Mapping):
    """Set up :attr:`PassContext.fold` and return ``model_options`` with the wrapper that fills it (or unchanged)."""
    state = ctx.state
    composer = state.composer
    step = pass_step(getattr(getattr(ctx.p, "sampler", None), "model_wrap_cfg", None))
    active = composer.active(step)
    if not active or state.router is None:
        return opts
    uncond_ran = _uncond_runs(opts, uncond, cond_scale)
    use_uncond = uncond_ran and composer.needs_uncond
    batch = int(x.shape[0])
    kinds = 2 if uncond_ran else 1
    merged = composer.needs_merged(active)
    extra = len(active) + merged  # branch blocks per chunk kind they need, the merged row's included
    rows = batch * kinds * (1 + extra) if use_uncond else batch * (kinds + extra)
    if _fold_refusal(ctx, model, x, uncond, cond, opts, rows):
        return opts
    texts = _compile_step_texts(ctx, cond, uncond if use_uncond else None, active)
    ctx.fold = _Fold(step, active, batch, use_uncond, texts, merged=merged)
    out = dict(opts)
    out["model_function_wrapper"] = _fold_wrapper(ctx)
    return out


def _own_text(fold: _Fold, j: int, kind: int, key: str, like: torch.Tensor) -> torch.Tensor | None:
    """Branch ``j``'s own ``key`` text rows for a chunk of ``kind`` laid out as ``like`` (None: the base rows)."""
    own = fold.texts.get(j)
    conds = None if own is None else own[kind]
    if not conds:
        return None
    tensor = getattr(conds[0]["model_conds"].get(key), "cond", None)
    if not isinstance(tensor, torch.Tensor):
        return None
    tensor = tensor.to(like)
    if tensor.shape[0] != like.shape[0]:
        tensor = tensor.repeat(-(-like.shape[0] // tensor.shape[0]), *([1] * (tensor.dim() - 1)))[:like.shape[0]]
    if tensor.dim() == 3 and tensor.shape[1] != like.shape[1]:
        if like.shape[1] % tensor.shape[1]:
            raise RoutingError(f"branch text of {tensor.shape[1]} tokens does not tile the call's {like.shape[1]}")
        tensor = tensor.repeat(1, like.shape[1] // tensor.shape[1], 1)  # Forge pads cond/uncond to a common length
    return tensor


def _fold_wrapper(ctx: PassContext) -> Callable:
    """The model-function wrapper that adds the branch rows to Forge's call and keeps their outputs.

    The call's rows become ``[Forge's chunks | branch blocks]``: per active branch (in
    order) one block of ``B`` rows per chunk of a kind it needs, each a copy of that
    chunk's rows with the branch's own text. ``transformer_options`` describe the longer
    batch (``cond_or_uncond``, indices, marks), so patches that act per chunk treat a
    branch block as a chunk of its kind. The branch rows are routed to their LoRAs only
    inside the call; Forge gets back its own rows.
    """

    def wrapper(apply_model, params):
        fold = ctx.fold
        x, t, c, marks = params["input"], params["timestep"], params["c"], list(params["cond_or_uncond"])
        if fold is None or fold.closed or ctx.closed:
            return apply_model(x, t, **c)
        batch = fold.batch
        n = int(x.shape[0])
        if n != len(marks) * batch:
            return apply_model(x, t, **c)  # not a layout this step prepared: its branches run apart
        blocks = []
        for j in [*fold.active, *([MERGED] if fold.merged else [])]:
            for o, kind in enumerate(marks):
                if kind in fold.done or (kind == _UNCOND and not fold.use_uncond):
                    continue
                blocks.append((j, kind, o))
        if not blocks:
            return apply_model(x, t, **c)
        fold.done.update(kind for _, kind, _ in blocks)
        picks = [slice(o * batch, (o + 1) * batch) for _, _, o in blocks]
        x_ext = torch.cat([x, *(x[r] for r in picks)])
        t_ext = torch.cat([t, *(t[r] for r in picks)])
        c_ext = {}
        for key, value in c.items():
            if key == "transformer_options":
                c_ext[key] = _extended_options(value, marks, blocks, ctx.backend)
            elif isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
                parts = [value]
                for (j, kind, _o), r in zip(blocks, picks, strict=True):
                    own = _own_text(fold, j, kind, key, value[r]) if key in _TEXT_CONDS else None
                    parts.append(value[r] if own is None else own)
                c_ext[key] = torch.cat(parts)
            else:
                c_ext[key] = value
        n_adapters = len(ctx.state.branches)
        rows: list = [None] * n_adapters
        shared = None  # the merged row's blocks: every active LoRA on the same rows
        for i, (j, _kind, _o) in enumerate(blocks):
            start = n + i * batch
            if j == MERGED:
                shared = slice(shared.start if shared is not None else start, start + batch)
            else:
                rows[j] = slice(rows[j].start if rows[j] is not None else start, start + batch)
        if shared is not None:
            for j in fold.active:
                rows[j] = [rows[j], shared]
        ctx.calls.append((int(x_ext.shape[0]), len(fold.active)))
        errors: list = []  # an error of the routing itself: reported by the post-CFG function, Forge's rows stay exact
        try:
            with ctx.state.router.route(rows, errors=errors):
                out = apply_model(x_ext, t_ext, **c_ext)
        except Exception as exc:  # Forge's own call failed with our rows in it: say so, then it is Forge's error
            ctx.closed = True
            fail(ctx.p, ctx.state, exc, "the model call with the branch rows")
            raise
        if errors:
            fold.error = errors[0]
        else:
            for i, (j, kind, _o) in enumerate(blocks):
                fold.outputs[(j, kind)] = out[n + i * batch:n + (i + 1) * batch]
        return out[:n]

    return wrapper


def _extended_options(options, chunks: list[int], blocks: list[tuple], backend: Backend):
    """``transformer_options`` of the longer batch: the chunk marks and what the host derives from them.

    ``chunks``: the call's own chunk marks; ``blocks``: the added ``(branch, kind, chunk)``
    blocks, each a copy of one of those chunks. Forge derives ``cond_mark`` and the
    cond/uncond indices from the marks; reForge keeps one ``uuids`` entry per chunk (its
    hooks group rows by them), which a copied chunk shares with its source.
    """
    if not isinstance(options, Mapping):
        return options
    out = dict(options)
    marks = list(chunks) + [kind for _, kind, _ in blocks]
    out["cond_or_uncond"] = marks
    uuids = out.get("uuids")
    if isinstance(uuids, list) and len(uuids) == len(chunks):
        out["uuids"] = uuids + [uuids[o] for _, _, o in blocks]
    sigmas = out.get("sigmas")
    if isinstance(sigmas, torch.Tensor):
        per = int(sigmas.shape[0])
        if "cond_mark" in out:
            mark = backend.compute_cond_mark
            out["cond_mark"] = (mark(marks, sigmas) if mark is not None else
                                torch.tensor([m for m in marks for _ in range(per)]).to(sigmas))
        if "cond_indices" in out or "uncond_indices" in out:
            indices = backend.compute_cond_indices
            if indices is not None:
                out["cond_indices"], out["uncond_indices"] = indices(marks, sigmas)
            else:
                out["cond_indices"] = [i * per + r for i, m in enumerate(marks) if m == _COND for r in range(per)]
                out["uncond_indices"] = [i * per + r for i, m in enumerate(marks) if m == _UNCOND for r in range(per)]
    return out
