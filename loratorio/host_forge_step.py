"""Forge adapter, the per-step functions registered on the pass's UNet clone.

Forge never fires ``on_cfg_denoised``; its sampler hands every extension a *post-CFG
function* instead (``backend/sampling/sampling_function.py:314-317``). Per sampling pass
the UNet clone gets

- a conditioning modifier that records the CFG scale and prepares the step: where it
  can, the branch rows join Forge's own model call (one call per step; see
  :mod:`loratorio.host_forge_fold`);
- a post-CFG function (:func:`make_post_cfg`) that fuses the branch predictions with the
  base predictions (method steps 1-8) and returns the guided result. Where a host feature
  keeps the branches out of Forge's call (a ControlNet, another extension's
  model-function wrapper, an AND prompt, the max-rows setting, too little free memory:
  see ``_fold_refusal``), it runs them through Forge's ``calc_cond_uncond_batch`` with the
  compiled conds it receives, in calls of their own.

The base rows are never routed: per-row LoRA routing (:mod:`loratorio.routing`) touches only
the branch rows, and only while a model call with branch rows runs. Forge's
predictions are always *denoised* (x0) estimates, for every model family
(``backend/modules/k_model.py:25-46``); fusion runs in that form with ``x``.

An error here stops the generation (:func:`guarded`, :func:`fail`) through the WebUI's
interrupt, and gives Forge back the patcher the pass cloned (:func:`release_pass`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .generation import GenerationState, usable
from .host_forge_backend import Backend, detect
from .host_lifecycle import guarded_by, stop_generation
from .routing import RoutingError

if TYPE_CHECKING:
    from .host_forge_fold import _Fold

__all__ = ["MERGED", "PassContext", "fail", "guarded", "make_post_cfg", "note", "pass_step", "release_pass"]

# -- the per-step hook ------------------------------------------------------------------------


def pass_step(denoiser) -> int:
    """0-based sampling step of the current pass from Forge's CFG denoiser.

    ``denoiser.step`` counts model calls; second-order samplers make two per step and
    declare ``total_steps = 2 * steps`` (``modules/sd_samplers_common.py:17-21``), so
    both calls of a step get the same index. (``state.sampling_step`` lags a step
    behind: the sampler's callback sets it after each step.)
    """
    calls = int(getattr(denoiser, "step", 0) or 0)
    steps = int(getattr(denoiser, "steps", 0) or 0)
    total = int(getattr(denoiser, "total_steps", 0) or 0)
    if steps <= 0 or total <= 0:
        return calls
    return min(steps - 1, calls * steps // total)


def _cfg(opts: Mapping, x, sigma, model, cond_scale: float, edit_strength: float, cond, uncond):
    """Forge's CFG step (``sampling_function.py:305-312``) on x0 predictions ``cond``/``uncond``.

    ``uncond`` None: no unconditional pass ran (reForge passes None where Forge passes
    zeros at CFG 1), and the result is ``cond`` as those hosts give it.
    """
    if uncond is None:
        return cond
    fn = opts.get("sampler_cfg_function")
    if fn is not None:
        args = {"cond": x - cond, "uncond": x - uncond, "cond_scale": cond_scale, "timestep": sigma, "input": x,
                "sigma": sigma, "cond_denoised": cond, "uncond_denoised": uncond, "model": model,
                "model_options": opts}
        return x - fn(args)
    if not math.isclose(edit_strength, 1.0):
        return uncond + (cond - uncond) * cond_scale * edit_strength
    return uncond + (cond - uncond) * cond_scale


@dataclass
class PassContext:
    """What the post-CFG function of one sampling pass needs (kept on the generation state).

    ``texts[j]``: branch ``j``'s ``(cond, uncond)`` prompt conditioning from its own text
    encoder (WebUI schedule objects; ``uncond`` may be None), or None for the base text.
    """

    state: GenerationState
    p: object
    texts: list = field(default_factory=list)
    max_rows: int = 0
    cond_scale: float | None = None
    closed: bool = False
    source_unet: object = None  # the patcher this pass cloned
    unet: object = None  # the clone carrying the LoRAtorio step
    calls: list = field(default_factory=list)  # (rows, branches) of every routed model call
    step_texts: dict = field(default_factory=dict)
    merged_text: tuple | None = None  # the merged row's (cond, uncond) prompt conditioning, every LoRA's encoder
    fold: _Fold | None = None  # the current model call's branch rows inside Forge's own batch (host_forge_fold)
    post_cfg: Callable | None = None  # this pass's post-CFG function (to know whether it runs first)
    _backend: Backend | None = None

    @property
    def backend(self) -> Backend:
        """The WebUI's backend, detected once per pass (the step functions call it at every model call)."""
        if self._backend is None:
            self._backend = detect()
        return self._backend


_COND, _UNCOND = 0, 1  # Forge's cond_or_uncond marks
MERGED = -1  # the merged row's place among branch indices: every active LoRA at once (method ``joint``)


def _spans(rows: int, group: Sequence[int], batch: int) -> list[list[slice]]:
    """Row slices of each member of ``group`` in a model call of ``rows`` rows.

    The branch input is ``len(group)`` blocks of ``batch`` rows (branch-major). Forge
    concatenates whole copies of it, one per chunk (``cond_or_uncond`` entry), and a
    wrapper may batch it further; the layout therefore repeats every
    ``len(group) * batch`` rows, whatever the order of the chunks.
    """
    block = len(group) * batch
    if rows <= 0 or rows % block:
        raise RoutingError(f"a model call of {rows} rows does not hold whole copies of the {block} branch rows; "
                           "another extension changed the batch inside the model call")
    return [[slice(c * block + k * batch, c * block + (k + 1) * batch) for c in range(rows // block)]
            for k in range(len(group))]


def _routed_options(ctx: PassContext, opts: Mapping, group: Sequence[int], batch: int, merged: bool = False) -> dict:
    """A copy of ``model_options`` whose model-function wrapper routes ``group``'s LoRAs around the model call.

    A wrapper already there (tiled diffusion, ...) is kept and handed a routed
    ``apply_model``, so it runs as usual with the branches' LoRAs switched on only
    inside the actual model call. ``merged``: the call is the merged row, every LoRA of
    ``group`` on all of its rows.
    """
    previous = opts.get("model_function_wrapper")
    n = len(ctx.state.branches)

    def routed(apply_model):
        def call(x, t, **c):
            # a branch owns one row block per chunk of the call (AND parts, a wrapper batching tiles)
            spans = _spans(x.shape[0], [MERGED] if merged else group, batch)
            rows: list = [None] * n
            for k, j in enumerate(group):
                rows[j] = spans[0 if merged else k]
            ctx.calls.append((int(x.shape[0]), len(group)))
            with ctx.state.router.route(rows):
                return apply_model(x, t, **c)

        return call

    def wrapper(apply_model, params):
        if previous is not None:
            return previous(routed(apply_model), params)
        return routed(apply_model)(params["input"], params["timestep"], **params["c"])

    out = dict(opts)
    out["model_function_wrapper"] = wrapper
    return out


_TEXT_CONDS = ("c_crossattn", "y")  # what a branch's own text encoder changes: tokens and pooled vector


def _branch_conds(base: list, owns: list) -> list:
    """Compiled conds of a branch call: ``base`` (one dict per AND part, B rows each) with each branch's text.

    ``owns[k]`` is the k-th branch's own compiled list (same parts) or None for the base
    text. Everything else (image conds, Flux guidance, ControlNet, AND strength) stays as
    Forge built it; Forge repeats those conditions to the rows of the call, which tiles
    them once per branch.
    """
    if all(o is None for o in owns):
        return base
    out = []
    for m, entry in enumerate(base):
        model_conds = dict(entry["model_conds"])
        for key in _TEXT_CONDS:
            cond = model_conds.get(key)
            base_tensor = getattr(cond, "cond", None)
            if not isinstance(base_tensor, torch.Tensor):
                continue
            rows = []
            for own in owns:
                mine = own[m]["model_conds"].get(key) if own is not None else None
                mine = getattr(mine, "cond", None)
                rows.append(base_tensor if mine is None else mine.to(base_tensor))
            model_conds[key] = type(cond)(torch.cat(rows))
        new = dict(entry)
        new["model_conds"] = model_conds
        out.append(new)
    return out


def _group_size(ctx: PassContext, model, x: torch.Tensor, parts: int, n_active: int) -> int:
    """Branches per model call: within the max-rows setting and what Forge's estimate says fits in free memory."""
    batch = int(x.shape[0])
    g = n_active
    if ctx.max_rows > 0:
        g = max(1, min(g, ctx.max_rows // max(1, batch * parts)))
    estimate = getattr(model, "memory_required", None)
    if estimate is not None and g > 1:
        free = ctx.backend.get_free_memory(x.device)
        while g > 1 and estimate([g * batch, *x.shape[1:]]) >= free:
            g -= 1
    return g


def _run_branches(ctx: PassContext, active: list[int], args: Mapping, conds: list, kind: str) -> torch.Tensor:
    """x0 predictions of the ``active`` branches for the compiled ``conds``: ``[len(active), B, C, H, W]``."""
    backend = ctx.backend
    x, sigma, model, opts = args["input"], args["sigma"], args["model"], args["model_options"]
    batch = int(x.shape[0])
    g = _group_size(ctx, model, x, len(conds), len(active))
    outs = []
    for start in range(0, len(active), g):
        group = active[start:start + g]
        x_t = x.repeat(len(group), *([1] * (x.dim() - 1)))
        sigma_t = sigma.repeat(len(group))
        own = [ctx.step_texts.get(j, (None, None))[0 if kind == "cond" else 1] for j in group]
        conds_t = _branch_conds(conds, own)
        out, _ = backend.calc_cond_uncond_batch(model, conds_t, None, x_t, sigma_t,
                                                 _routed_options(ctx, opts, group, batch))
        outs.append(out.reshape(len(group), batch, *x.shape[1:]))
    return torch.cat(outs)


def _run_merged(ctx: PassContext, active: list[int], args: Mapping, conds: list, kind: str) -> torch.Tensor:
    """x0 prediction of the merged row (every ``active`` LoRA at once) for the compiled ``conds``: ``[B, C, H, W]``."""
    x, sigma, model, opts = args["input"], args["sigma"], args["model"], args["model_options"]
    own = ctx.step_texts.get(MERGED, (None, None))[0 if kind == "cond" else 1]
    out, _ = ctx.backend.calc_cond_uncond_batch(model, _branch_conds(conds, [own]), None, x, sigma,
                                                _routed_options(ctx, opts, active, int(x.shape[0]), merged=True))
    return out


def _compile_step_texts(ctx: PassContext, base_cond: list, base_uncond: list | None, active: list[int]) -> dict:
    """The active branches' own text conds at the denoiser's current model call (prompt editing follows)."""
    if not ctx.texts:
        return {}
    from modules import prompt_parser

    backend = ctx.backend
    denoiser = getattr(getattr(ctx.p, "sampler", None), "model_wrap_cfg", None)
    call = int(getattr(denoiser, "step", 0) or 0)
    out = {}
    for j in [*active, MERGED]:
        texts = ctx.merged_text if j == MERGED else ctx.texts[j] if j < len(ctx.texts) else None
        if texts is None:
            continue
        c, uc = texts
        composition, tensor = prompt_parser.reconstruct_multicond_batch(c, call)
        cond = backend.compile_weighted_conditions(tensor, composition)
        uncond = None
        if uc is not None and base_uncond is not None:
            uncond = backend.compile_conditions(prompt_parser.reconstruct_cond_batch(uc, call))
            if len(uncond) != len(base_uncond):
                uncond = None
        if len(cond) != len(base_cond):
            continue  # another extension reshaped the conds: the base text is the safe choice
        out[j] = (cond, uncond)
    return out


def _post_cfg(ctx: PassContext, args: Mapping) -> torch.Tensor:
    """One denoising step: branch predictions, fusion (method steps 1-8), Forge's CFG on the fused pair."""
    state = ctx.state
    composer = state.composer
    x, sigma, model, opts = args["input"], args["sigma"], args["model"], args["model_options"]
    cond, uncond = args["cond"], args["uncond"]
    cond_pred, uncond_pred = args["cond_denoised"], args["uncond_denoised"]
    # The scale the sampler used at this call: the post-CFG arguments carry it on Neo, Classic and reForge
    # (reForge's conditioning modifier sees the user's scale at steps it then runs at 1); Forge's do not.
    cond_scale = args.get("cond_scale")
    if cond_scale is None:
        cond_scale = ctx.cond_scale if ctx.cond_scale is not None else float(getattr(ctx.p, "cfg_scale", 1.0))
    cond_scale = float(cond_scale)
    # At CFG 1 Forge runs no uncond pass and uncond_pred is zeros (sampling_function.py:295-298); reForge's is None.
    uncond_ran = uncond is not None and uncond_pred is not None and not (
        math.isclose(cond_scale, 1.0) and not opts.get("disable_cfg1_optimization", False))
    fold, ctx.fold = ctx.fold, None
    if fold is not None:
        fold.closed = True  # later calls of this step (the branch calls below, if any) run plain
        if fold.error is not None:
            raise fold.error
        step, active = fold.step, fold.active
    else:
        step = pass_step(getattr(getattr(ctx.p, "sampler", None), "model_wrap_cfg", None))
        active = composer.active(step)
    if not active:
        return args["denoised"]
    use_uncond = uncond_ran and composer.needs_uncond
    if composer.needs_uncond and not uncond_ran:
        state.extra["steps_without_uncond"] = state.extra.get("steps_without_uncond", 0) + 1
    state.extra["steps"] = state.extra.get("steps", 0) + 1
    folded = fold.outputs if fold is not None else {}
    need = [("cond", _COND, cond)] + ([("uncond", _UNCOND, uncond)] if use_uncond else [])
    preds, merged = {}, {}
    use_merged = composer.needs_merged(active)

    def own_call(run, *call_args):
        # rows that did not ride in Forge's call (see _fold_refusal) get calls of their own, with the
        # step's branch texts compiled once for all of them
        if not ctx.step_texts:
            ctx.step_texts = (fold.texts if fold is not None else
                              _compile_step_texts(ctx, cond, uncond if use_uncond else None, active))
        return run(ctx, active, args, *call_args)

    try:
        for name, kind, conds in need:
            if all((j, kind) in folded for j in active):
                preds[name] = torch.stack([folded[(j, kind)] for j in active])
            else:
                preds[name] = own_call(_run_branches, conds, name)
        for name, kind, conds in need if use_merged else ():
            merged[name] = folded[(MERGED, kind)] if (MERGED, kind) in folded else own_call(_run_merged, conds, name)
    finally:
        ctx.step_texts = {}
    lora_cond, lora_uncond = preds["cond"], preds.get("uncond")
    res = composer.fuse(step=step, active=active, base_cond=cond_pred, lora_cond=lora_cond,
                        base_uncond=uncond_pred if uncond_ran else None, lora_uncond=lora_uncond, x=x,
                        merged_cond=merged.get("cond"), merged_uncond=merged.get("uncond"))
    fused_uncond = res.uncond if uncond_ran else uncond_pred
    edit_strength = sum(item.get("strength", 1) for item in cond)
    base = _cfg(opts, x, sigma, model, cond_scale, edit_strength, cond_pred, uncond_pred)
    fused = _cfg(opts, x, sigma, model, cond_scale, edit_strength, res.cond, fused_uncond)
    if _runs_first(ctx, opts):
        return fused  # nothing ran before: Forge's CFG result is ``base`` itself
    return args["denoised"] + (fused - base)  # keep what earlier post-CFG functions added


def _runs_first(ctx: PassContext, opts: Mapping) -> bool:
    """Whether this pass's post-CFG function is the first Forge runs (no earlier one changed the CFG result)."""
    functions = opts.get("sampler_post_cfg_function") or []
    return bool(functions) and ctx.post_cfg is not None and functions[0] is ctx.post_cfg


def make_post_cfg(ctx: PassContext) -> Callable[[dict], torch.Tensor]:
    """The post-CFG function of one pass: ``fn(args) -> denoised`` (``sampling_function.py:314-317``).

    ``args`` (all in the denoised form): ``denoised`` (the CFG result so far), ``cond`` /
    ``uncond`` (compiled condition lists), ``cond_denoised`` / ``uncond_denoised`` (base
    predictions), ``input`` (x), ``sigma``, ``model`` (KModel), ``model_options``.
    A closure, not a bound method: Forge deep-copies ``model_options`` on every clone
    and copies functions by reference. An error stops the generation through the
    WebUI's interrupt after this step, which keeps the base result.
    """

    def post_cfg(args):
        if ctx.closed or not usable(ctx.state) or ctx.state.composer is None:
            return args["denoised"]
        try:
            return _post_cfg(ctx, args)
        except Exception as exc:
            ctx.closed = True
            fail(ctx.p, ctx.state, exc, "composing a step")
            return args["denoised"]

    return post_cfg


# -- errors and notes ------------------------------------------------------------------------


def release_pass(p, state: GenerationState) -> None:
    """Stop the pass's step function and give Forge back the patcher the pass cloned."""
    ctx = state.extra.get("pass")
    if ctx is None:
        return
    ctx.closed = True
    forge_objects = getattr(getattr(p, "sd_model", None), "forge_objects", None)
    if forge_objects is not None and forge_objects.unet is ctx.unet:
        forge_objects.unet = ctx.source_unet


def note(state: GenerationState, text: str) -> None:
    if text not in state.notes:
        state.notes.append(text)


def fail(p, state: GenerationState | None, exc: BaseException, where: str) -> None:
    """An error inside our hooks: stop the generation cleanly and say why."""
    stop_generation(p, state, exc, where, release=release_pass)


def guarded(p, where: str):
    """A hook's work; an error in it stops the generation through :func:`fail`."""
    return guarded_by(fail, p, where)
