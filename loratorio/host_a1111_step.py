"""A1111 adapter, the per-step hook (``on_cfg_denoiser`` / ``on_cfg_denoised``).

The branch rows join the denoiser's own batch, between its cond and its uncond rows, so
A1111's one model call evaluates the base rows (unrouted, unchanged) and every branch
row (routed to its LoRA only during that call). Where A1111 itself calls the model in
pieces (``batch_cond_uncond`` off, prompt and negative prompt of different token
lengths) or the max-rows setting caps a call, the base rows run as
A1111 runs them and one extra routed call evaluates the branch rows (chunked by the
max-rows setting). The :class:`~loratorio.engine.Composer` fuses them (method steps
1-8), and the fused cond rows and re-centred uncond rows are written back into the
denoiser's output in place; A1111's own CFG combines them. k-diffusion samplers give
*denoised* predictions (fused with ``x``), DDIM/PLMS/UniPC give *noise* predictions.

Errors here stop the generation (:func:`guarded`) through the WebUI's interrupt.
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from .generation import GenerationState, call_rows, get_state, plan_calls, usable
from .host_a1111_lora import A1111Bridge, _shared
from .host_a1111_text import PassConds, hires_conds
from .host_lifecycle import guarded_by, stop_generation

log = logging.getLogger("loratorio")

# The generation in progress, for 1.6/1.7 callbacks whose params carry no denoiser.
# Only a weak pointer: all of a generation's data lives on its processing object.
_current: dict[str, weakref.ref | None] = {"p": None}


def fail(p, state: GenerationState | None, exc: BaseException, where: str) -> None:
    """An error inside our hooks: stop the generation cleanly and say why."""
    stop_generation(p, state, exc, where, release=release_step)


def release_step(p, state: GenerationState) -> None:
    """Take away the routing a prepared step left on the UNet (its model call did not come)."""
    _drop_pending(state)
    _close_watches()


def guarded(p, where: str):
    """A hook's work; an error in it stops the generation through :func:`fail`."""
    return guarded_by(fail, p, where)


# -- the per-step hook ---------------------------------------------------------------------------


MERGED = -1  # the merged row's place among branch indices: every active LoRA at once (method ``joint``)


@dataclass
class _Folded:
    """The branch rows a step added to the host's own model call (the one-call layout).

    The denoiser's batch becomes ``[base cond rows | branch blocks | base uncond rows]``:
    branch ``active[k]`` owns one block of its cond rows (the cond rows' latents with its
    own text) followed, when re-centring needs them, by its uncond rows (the uncond rows'
    latents with its own negative text); the merged row's blocks (branch ``MERGED``) come
    after them, routed to every active LoRA. The uncond rows stay last, where the host's CFG
    and its skip-uncond cut expect them; its text batch is ``text_cond`` followed by the
    branch texts, so the host concatenates cond and uncond texts in the same order.
    """

    active: list[int]
    n_cond: int
    n_uncond: int
    block_rows: list[tuple[int, str, int]]  # (branch, "cond"/"uncond", rows) in batch order
    rows: list  # routing rows of the whole call, per branch
    watch: _CallWatch | None = None

    @property
    def n_branch(self) -> int:
        return sum(n for _, _, n in self.block_rows)


class _CallWatch:
    """Routes the branch rows of the host's next UNet call, and only that call.

    The UNet's ``forward`` is wrapped for one call (an instance attribute, set when the
    step is prepared and taken away as that call starts): inside it the branch rows are
    routed in a ``with`` block, so the routed forwards exist only while the call runs and
    leave on any exception, KeyboardInterrupt included. A call of another size is not the
    one this step prepared and runs unrouted. ``rows_seen`` is the batch the UNet got (the
    host drops the uncond rows on skip-uncond steps); ``errors`` collects an error of the
    routing itself, which the step reports after the call (the host's rows stay exact).
    ``on_error`` is told of any other exception of the call before it propagates.
    """

    def __init__(self, router, unet: nn.Module, rows: list, expected: tuple[int, ...], on_error=None):
        self.router, self.unet, self.rows, self.expected = router, unet, rows, expected
        self.on_error = on_error
        self.rows_seen: int | None = None
        self.errors: list = []
        self.closed = False
        self._had = "forward" in unet.__dict__
        self._previous = unet.__dict__.get("forward")
        inner = unet.forward

        def forward(*args, **kwargs):
            if self.closed:
                return inner(*args, **kwargs)
            self.close()
            x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            rows = int(x.shape[0]) if isinstance(x, torch.Tensor) else -1
            if rows not in self.expected:
                return inner(*args, **kwargs)  # not the call this step prepared (``_run_step`` then says so)
            self.rows_seen = rows
            try:
                route = self.router.route(self.rows, errors=self.errors)
                route.__enter__()
            except Exception as exc:  # reported after the call, which runs unrouted
                self.errors.append(exc)
                return inner(*args, **kwargs)
            try:
                return inner(*args, **kwargs)
            except Exception as exc:
                if self.on_error is not None:
                    self.on_error(exc)
                raise
            finally:
                route.__exit__(None, None, None)

        self._forward = forward
        unet.forward = forward
        _WATCHES.add(self)

    def close(self) -> None:
        """Take the wrapper away (unless another wrapper went on top since); idempotent."""
        if self.closed:
            return
        self.closed = True
        _WATCHES.discard(self)
        if self.unet.__dict__.get("forward") is self._forward:
            if self._had:
                self.unet.forward = self._previous
            else:
                del self.unet.forward


_WATCHES: weakref.WeakSet = weakref.WeakSet()


def _close_watches() -> None:
    """Take away every prepared step's routing (a new job, a model change: nothing may carry over)."""
    for watch in list(_WATCHES):
        watch.close()


@dataclass
class _StepInput:
    x: torch.Tensor
    sigma: torch.Tensor
    image_cond: torch.Tensor
    text_cond: object
    text_uncond: object
    denoiser: object
    eval_index: int
    inner_model: object = None  # the model the denoiser calls; identifies the step in ``on_cfg_denoised``
    folded: _Folded | None = None  # set when the branch rows ride in the host's own call

    def matches(self, params) -> bool:
        """Whether ``params`` (CFGDenoisedParams) are the outcome of this prepared step.

        A step prepared by a job whose own model call then failed stays behind; the
        next call's output must never be fused with it.
        """
        inner = getattr(params, "inner_model", None)
        if self.inner_model is not None and inner is not None and inner is not self.inner_model:
            return False
        x_out = getattr(params, "x", None)
        # a different batch size is a layout error that ``_run_step`` reports; other sizes mean another job
        return isinstance(x_out, torch.Tensor) and x_out.shape[1:] == self.x.shape[1:]

    def release(self) -> None:
        if self.folded is not None and self.folded.watch is not None:
            self.folded.watch.close()


def _p_of(params):
    denoiser = getattr(params, "denoiser", None)
    p = getattr(denoiser, "p", None)
    if p is not None:
        ref = _current["p"]
        if ref is None or ref() is not p:
            # the denoiser names the generation in progress: a pointer to another one is stale
            # (a job that failed before postprocess, or a runner that never called process())
            _current["p"] = weakref.ref(p)
        return p, denoiser
    ref = _current["p"]
    p = ref() if ref is not None else None
    if p is None:
        return None, None
    sampler = getattr(p, "sampler", None)
    return p, getattr(sampler, "model_wrap_cfg", None)


def _drop_pending(state) -> None:
    pending = state.extra.pop("pending", None)
    if pending is not None:
        pending.release()


def on_cfg_denoiser(params) -> None:
    p, denoiser = _p_of(params)
    state = get_state(p) if p is not None else None
    if state is not None:
        _drop_pending(state)
    if not usable(state) or state.composer is None or denoiser is None:
        return
    with guarded(p, "preparing a step"):
        if not _prepare_pass(p, state):
            return
        st = _StepInput(params.x, params.sigma, params.image_cond, params.text_cond, params.text_uncond, denoiser,
                        int(getattr(denoiser, "step", 0)), getattr(denoiser, "model_wrap", None))
        state.extra["pending"] = st
        _fold(p, state, st, params)


def on_cfg_denoised(params) -> None:
    # CFGDenoisedParams carry no denoiser: the generation in progress is the one to look at
    ref = _current["p"]
    p = ref() if ref is not None else None
    state = get_state(p) if p is not None else None
    if state is None:
        return
    pending = state.extra.pop("pending", None)
    if pending is not None:
        pending.release()
    if not usable(state) or pending is None or state.composer is None or not pending.matches(params):
        return
    with guarded(p, "composing a step"):
        _run_step(p, state, pending, params.x, params.inner_model)


def _prepare_pass(p, state: GenerationState) -> bool:
    """Start of a sampling pass: hires conds and a restarted schedule. False: skip this pass."""
    pass_id = "hr" if getattr(p, "is_hr_pass", False) else "first"
    if state.extra.get("pass") == pass_id:
        return not state.extra.get("pass_off", False)
    state.extra["pass"] = pass_id
    state.extra["pass_off"] = False
    if id(_shared().sd_model) != state.extra.get("model_id"):
        state.extra["pass_off"] = True
        note = "the model changed during the generation (hires checkpoint?); not applied after the change"
        if note not in state.notes:
            state.notes.append(note)
        return False
    if pass_id == "hr":
        bridge = state.extra.get("bridge") or A1111Bridge()
        state.extra["conds"] = hires_conds(p, state, bridge)
    state.composer.new_pass()
    return True


def _step_index(denoiser, eval_index: int) -> int:
    """0-based sampling step of the pass from the denoiser's evaluation count.

    ``state.sampling_step`` lags one step behind on k-diffusion samplers (it is set by the
    sampler's callback after each step); second-order samplers evaluate twice per step
    and A1111 counts that in ``total_steps``.
    """
    steps = getattr(denoiser, "steps", None) or 0
    total = getattr(denoiser, "total_steps", None) or 0
    per_step = max(1, int(total) // int(steps)) if steps and total else 1
    index = eval_index // per_step
    return min(index, steps - 1) if steps else index


def _denoised_form(denoiser) -> bool:
    """k-diffusion samplers give denoised predictions; timestep samplers give noise."""
    try:
        from modules import sd_samplers_timesteps

        return not isinstance(denoiser, sd_samplers_timesteps.CFGDenoiserTimesteps)
    except ImportError:
        return type(denoiser).__name__ != "CFGDenoiserTimesteps"


def _nrows(cond) -> int:
    return (cond["crossattn"] if isinstance(cond, dict) else cond).shape[0]


def _ntokens(cond) -> int:
    return (cond["crossattn"] if isinstance(cond, dict) else cond).shape[1]


def _sub(cond, a: int, b: int):
    if isinstance(cond, dict):
        return {k: v[a:b] for k, v in cond.items()}
    return cond[a:b]


def _cat(conds: list):
    if isinstance(conds[0], dict):  # SDXL: the host's DictWithShape keeps its type (its CFG reads ``.shape``)
        return type(conds[0])({k: torch.cat([c[k] for c in conds]) for k in conds[0]})
    return torch.cat(conds)


def _condition(text, image_cond):
    if isinstance(text, dict):
        return {**text, "c_concat": [image_cond]}
    return {"c_crossattn": [text], "c_concat": [image_cond]}


def _conds_list(p, denoiser, eval_index: int, state: GenerationState):
    """Rows of each image's sub-prompts with their AND weights, as the denoiser laid them out."""
    conds = state.extra.get("conds")
    source = None
    if conds is not None:
        source = next((c for c in conds.cond if c is not None), None)
    if source is None:
        sampler = getattr(denoiser, "sampler", None) or getattr(p, "sampler", None)
        source = (getattr(sampler, "sampler_extra_args", None) or {}).get("cond")
    if source is None:
        source = p.get_conds()[0]
    rows, out = 0, []
    for composables in source.batch:
        out.append([(rows + i, float(c.weight)) for i, c in enumerate(composables)])
        rows += len(composables)
    return out


def _branch_text(state, j: int, base_cond, base_uncond, eval_index: int):
    """Branch ``j``'s own text at this model call (``MERGED``: the merged row's), or the base text."""
    from modules import prompt_parser

    conds: PassConds | None = state.extra.get("conds")
    c, uc = base_cond, base_uncond
    if conds is None:
        return c, uc
    own_c, own_uc = (conds.merged_cond, conds.merged_uncond) if j == MERGED else (conds.cond[j], conds.uncond[j])
    if own_c is not None:
        _, c = prompt_parser.reconstruct_multicond_batch(own_c, eval_index)
        if own_uc is not None:
            uc = prompt_parser.reconstruct_cond_batch(own_uc, eval_index)
    return c, uc


def _early_skip(denoiser) -> bool:
    """The host's "skip early CFG" (``skip_early_cond``): no uncond rows at this model call."""
    early = float(getattr(_shared().opts, "skip_early_cond", 0) or 0)
    step, total = int(getattr(denoiser, "step", 0) or 0), int(getattr(denoiser, "total_steps", 0) or 0)
    return early != 0 and total > 0 and step / total <= early


def _ngms_possible(p, denoiser) -> bool:
    """Whether the host's negative-guidance minimum sigma (NGMS) may skip the uncond rows at this call."""
    s_min = float(getattr(p, "s_min_uncond", 0) or 0)
    step = int(getattr(denoiser, "step", 0) or 0)
    return s_min > 0 and bool(step % 2 or getattr(_shared().opts, "s_min_uncond_all", False))


def _blocks(state, st: _StepInput, active: list[int], n_cond: int, need_uncond: bool) -> list[tuple]:
    """One block of rows per (branch, cond/uncond): ``(branch, kind, x, sigma, image_cond, text)``.

    The merged row (``MERGED``) follows the branches when the method uses it.
    """
    blocks = []
    for j in [*active, *([MERGED] if state.composer.needs_merged(active) else [])]:
        c, uc = _branch_text(state, j, st.text_cond, st.text_uncond, st.eval_index)
        blocks.append((j, "cond", st.x[:n_cond], st.sigma[:n_cond], st.image_cond[:n_cond], c))
        if need_uncond:
            blocks.append((j, "uncond", st.x[n_cond:], st.sigma[n_cond:], st.image_cond[n_cond:], uc))
    return blocks


def _fold(p, state: GenerationState, st: _StepInput, params) -> None:
    """Put the step's branch rows into the host's own model call when the host makes one call of equal texts.

    Otherwise (see :func:`_fold_refusal`) nothing changes here and ``_run_step`` runs the
    branch rows in a call of their own after the host's.
    """
    composer = state.composer
    n_uncond = _nrows(st.text_uncond)
    n_cond = st.x.shape[0] - n_uncond
    if state.router is None or n_cond != _nrows(st.text_cond) or n_cond <= 0:
        return
    active = composer.active(_step_index(st.denoiser, st.eval_index))
    if not active:
        return
    need_uncond = composer.needs_uncond and not _early_skip(st.denoiser)
    blocks = _blocks(state, st, active, n_cond, need_uncond)
    if _fold_refusal(state, st, blocks, n_cond + n_uncond):
        return
    unet = _unet_root()
    if unet is None:
        return
    n = len(state.branches)
    rows: list = [None] * n
    block_rows = []
    offset = n_cond
    shared = None  # the merged row's blocks: every active LoRA on the same rows
    for j, kind, x, _sigma, _ic, _text in blocks:
        start = offset
        offset += x.shape[0]
        if j == MERGED:
            shared = slice(start if shared is None else shared.start, offset)
        else:
            rows[j] = slice(start if rows[j] is None else rows[j].start, offset)
        block_rows.append((j, kind, x.shape[0]))
    if shared is not None:
        for j in active:
            rows[j] = [rows[j], shared]
    folded = _Folded(active, n_cond, n_uncond, block_rows, rows)
    params.x = torch.cat([st.x[:n_cond], *(b[2] for b in blocks), st.x[n_cond:]])
    params.sigma = torch.cat([st.sigma[:n_cond], *(b[3] for b in blocks), st.sigma[n_cond:]])
    params.image_cond = torch.cat([st.image_cond[:n_cond], *(b[4] for b in blocks), st.image_cond[n_cond:]])
    params.text_cond = _cat([st.text_cond, *(b[5] for b in blocks)])
    total = n_cond + folded.n_branch + n_uncond

    def failed(exc: BaseException) -> None:
        fail(p, state, exc, "the model call with the branch rows")

    folded.watch = _CallWatch(state.router, unet, rows, (total, total - n_uncond), failed)
    st.folded = folded


def _fold_refusal(state, st: _StepInput, blocks: list[tuple], base_rows: int) -> str | None:
    """Why the branch rows cannot join the host's call at this step (None: they can).

    The host calls the model more than once per step on its own when ``batch_cond_uncond``
    is off (one call per image batch) or when the prompt's and the negative prompt's token
    lengths differ (cond and uncond apart); more rows would only add calls there. The
    max-rows setting bounds the rows of one call.
    """
    if not bool(getattr(_shared().opts, "batch_cond_uncond", True)):
        return "batch_cond_uncond off"
    length = _ntokens(st.text_cond)
    if _ntokens(st.text_uncond) != length or any(_ntokens(b[5]) != length for b in blocks):
        return "token lengths differ"
    if isinstance(st.text_cond, dict) and any(set(b[5]) != set(st.text_cond) for b in blocks):
        return "conditioning keys differ"
    max_rows = int(state.settings.max_rows_per_call or 0)
    if max_rows and base_rows + sum(b[2].shape[0] for b in blocks) > max_rows:
        return "more rows than max_rows_per_call"
    return None


def _unet_root() -> nn.Module | None:
    model = getattr(getattr(_shared().sd_model, "model", None), "diffusion_model", None)
    return model if isinstance(model, nn.Module) else None


def _run_step(p, state: GenerationState, st: _StepInput, x_out: torch.Tensor, inner_model) -> None:
    """Fuse the step's branch predictions into ``x_out`` in place.

    The branch rows come from the host's own call (``st.folded``: they sit between its
    cond and uncond rows) or, where they could not join it, from extra routed calls here.
    """
    composer = state.composer
    n_uncond = _nrows(st.text_uncond)
    n_cond = st.x.shape[0] - n_uncond
    folded = st.folded
    extra = folded.n_branch if folded is not None else 0
    if st.x.shape[0] + extra != x_out.shape[0] or n_cond != _nrows(st.text_cond):
        raise RuntimeError(f"unexpected batch layout: x {list(st.x.shape)}, output {list(x_out.shape)}, "
                           f"{_nrows(st.text_cond)} cond and {n_uncond} uncond rows, {extra} branch rows")
    conds_list = _conds_list(p, st.denoiser, st.eval_index, state)
    if len(conds_list) != n_uncond or sum(len(c) for c in conds_list) != n_cond:
        raise RuntimeError(f"sub-prompt layout {[len(c) for c in conds_list]} does not match {n_cond} cond rows "
                           f"for {n_uncond} images")
    first_rows = [c[0][0] for c in conds_list]
    image_of_row = [i for i, c in enumerate(conds_list) for _ in c]
    state.extra["map_rows"] = first_rows

    step = _step_index(st.denoiser, st.eval_index)
    if folded is not None:
        active = folded.active
        seen = folded.watch.rows_seen if folded.watch is not None else None
        if seen is None:
            raise RuntimeError("the host's model call did not run the branch rows")
        if folded.watch.errors:
            raise folded.watch.errors[0]
        # the host drops the uncond rows (skip early CFG, NGMS) and puts copies of cond rows there
        skipped_uncond = seen == n_cond + extra
        need_uncond = composer.needs_uncond and not skipped_uncond and any(k == "uncond" for _, k, _ in
                                                                           folded.block_rows)
        outputs = {}
        offset = n_cond
        for j, kind, n in folded.block_rows:
            outputs[(j, kind)] = x_out[offset:offset + n]
            offset += n
    else:
        active = composer.active(step)
        if not active:
            return
        skipped_uncond = _early_skip(st.denoiser) or (
            _ngms_possible(p, st.denoiser) and float(st.sigma[0]) < float(p.s_min_uncond))
        need_uncond = composer.needs_uncond and not skipped_uncond
        outputs = _branch_calls(state, _blocks(state, st, active, n_cond, need_uncond), inner_model)

    base_cond = x_out[:n_cond]
    base_uncond_rows = x_out[x_out.shape[0] - n_uncond:]
    lora_cond = torch.stack([outputs[(j, "cond")] for j in active])
    base_uncond = lora_uncond = merged_uncond = None
    merged = composer.needs_merged(active)
    if need_uncond:
        if image_of_row == list(range(n_uncond)):  # one sub-prompt per image: the rows line up already
            base_uncond = base_uncond_rows
            lora_uncond = torch.stack([outputs[(j, "uncond")] for j in active])
            merged_uncond = outputs[(MERGED, "uncond")] if merged else None
        else:  # AND: each sub-prompt row against its image's uncond row (index copied without a device wait)
            idx = torch.tensor(image_of_row, dtype=torch.long).to(x_out.device, non_blocking=True)
            base_uncond = base_uncond_rows.index_select(0, idx)
            lora_uncond = torch.stack([outputs[(j, "uncond")].index_select(0, idx) for j in active])
            merged_uncond = outputs[(MERGED, "uncond")].index_select(0, idx) if merged else None
    res = composer.fuse(step=step, active=active, base_cond=base_cond, lora_cond=lora_cond,
                        base_uncond=base_uncond, lora_uncond=lora_uncond,
                        x=st.x[:n_cond] if _denoised_form(st.denoiser) else None,
                        merged_cond=outputs[(MERGED, "cond")] if merged else None, merged_uncond=merged_uncond)
    new_uncond = None
    if need_uncond and res.uncond is not None:
        new_uncond = _per_image(res.uncond, conds_list)
    # All computed: now write in place (the denoiser keeps its own reference to x_out).
    x_out[:n_cond] = res.cond.to(x_out.dtype)
    if new_uncond is not None:
        x_out[x_out.shape[0] - n_uncond:] = new_uncond.to(x_out.dtype)
    elif skipped_uncond:
        # the "uncond" rows are copies of each image's first cond row: keep them in step
        x_out[x_out.shape[0] - n_uncond:] = x_out[first_rows]


def _branch_calls(state: GenerationState, blocks: list[tuple], inner_model) -> dict:
    """Branch predictions from routed calls of their own, ``(branch, kind) -> rows`` (the two-call path)."""
    outputs: dict[tuple[int, str], torch.Tensor] = {}
    n = len(state.branches)
    active = sorted({b[0] for b in blocks if b[0] != MERGED})
    # Rows of different token lengths cannot share a call (A1111 itself calls them apart).
    for length in sorted({_ntokens(b[5]) for b in blocks}):
        group = [b for b in blocks if _ntokens(b[5]) == length]
        counts = [b[2].shape[0] for b in group]
        results = [torch.empty_like(b[2]) for b in group]
        owner = [b[0] for b in group]
        for call in plan_calls(counts, state.settings.max_rows_per_call):
            # the merged row's blocks come last (see _blocks): every active LoRA on those rows
            own = [e for e in call if owner[e[0]] != MERGED]
            rows = call_rows(own, n, owner)
            start = sum(b - a for _, a, b in own)
            stop = start + sum(b - a for k, a, b in call if owner[k] == MERGED)
            if stop > start:
                for j in active:
                    rows[j] = slice(start, stop) if rows[j] is None else [rows[j], slice(start, stop)]
            xs = torch.cat([group[k][2][a:b] for k, a, b in call])
            sig = torch.cat([group[k][3][a:b] for k, a, b in call])
            ic = torch.cat([group[k][4][a:b] for k, a, b in call])
            text = _cat([_sub(group[k][5], a, b) for k, a, b in call])
            with state.router.route(rows):
                out = inner_model(xs, sig, cond=_condition(text, ic))
            offset = 0
            for k, a, b in call:
                results[k][a:b] = out[offset:offset + b - a]
                offset += b - a
        for block, result in zip(group, results, strict=True):
            outputs[(block[0], block[1])] = result
    return outputs


def _per_image(rows: torch.Tensor, conds_list) -> torch.Tensor:
    """One re-centred uncond per image from its sub-prompt rows, weighted by |AND weight|."""
    out = []
    for entries in conds_list:
        if len(entries) == 1:
            out.append(rows[entries[0][0]])
            continue
        weights = [abs(w) for _, w in entries]
        total = sum(weights)
        if total == 0 or not math.isfinite(total):
            weights, total = [1.0] * len(entries), float(len(entries))
        mixed = sum(rows[r].float() * (w / total) for (r, _), w in zip(entries, weights, strict=True))
        out.append(mixed.to(rows.dtype))
    return torch.stack(out)
