"""Forge adapter, one sampling pass: per-branch text conds, memory, and the UNet clone.

Each branch's text conditioning comes from the WebUI's prompt machinery with the text
encoder (CLIP-L/G, T5) routed through that LoRA alone, per sampling pass; at every step
it is reconstructed for the denoiser's current model call (prompt editing follows).

:func:`install_pass` clones Forge's UNet patcher for the pass, registers the step
functions of :mod:`loratorio.host_forge_step` on the clone and assigns it back, as
Forge's built-in PAG does; the clone is Forge's throw-away per-pass copy, given back at
the end of a batch. Memory: branch rows go through Forge's own batching; the routed
factors are announced to Forge's memory manager
(``add_extra_preserved_memory_during_sampling``) and the peak estimate used to size the
model's share of the GPU covers the branch calls; nothing Forge owns is freed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .generation import GenerationState
from .host_forge_backend import compute_dtype, learned_conditioning, sd_conditioning, text_pass_kept
from .host_forge_fold import make_scale_recorder
from .host_forge_step import PassContext, make_post_cfg, note
from .lora import LowRank, OutputSlice, pieces
from .routing import Router

__all__ = ["branch_texts", "install_pass"]

# -- per-branch text encoder --------------------------------------------------------------------


def _finite(obj) -> bool:
    """Every float tensor inside WebUI conditioning objects (schedules, multicond, dicts) is finite."""
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, Mapping):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_finite(v) for v in obj)
    return True


def branch_texts(p, state: GenerationState, has_uncond: bool) -> tuple[list, tuple | None]:
    """Each branch's prompt conditioning computed with its own text-encoder LoRA, for this pass.

    Calls the WebUI's prompt machinery with the arguments ``processing.setup_conds`` /
    ``calculate_hr_conds`` use, so prompt editing, AND, BREAK, emphasis, SDXL's two
    encoders and Flux's CLIP-L + T5 (with its distilled guidance) follow; the text
    encoder's layers are routed through the one LoRA (no weight is written; Forge's text
    encoders have no packed projections). Returns ``([(cond, uncond) | None] per branch,
    merged)``: ``merged`` is the merged row's conditioning (every LoRA's text encoder at
    once) where the method uses that row, else None. A non-finite result falls back to
    the base text with a note.
    """
    if not state.settings.text_encoder_per_branch or not any(b.te for b in state.branches):
        return [], None
    from modules import devices, prompt_parser, sd_samplers, shared

    router = state.extra.get("te_router")
    if router is None:
        router = Router(state.extra["bridge"].te_targets(), [b.te for b in state.branches])
        state.extra["te_router"] = router
    use_old = bool(getattr(shared.opts, "use_old_scheduling", False))
    if getattr(p, "is_hr_pass", False):
        width, height = p.hr_upscale_to_x, p.hr_upscale_to_y
        texts, negatives = p.hr_prompts, p.hr_negative_prompts
        distilled = getattr(p, "hr_distilled_cfg", None)
        config = sd_samplers.find_sampler_config(getattr(p, "hr_sampler_name", None) or p.sampler_name)
        hr = getattr(p, "hr_second_pass_steps", 0) or p.steps
        steps, hires_steps = p.firstpass_steps, (config.total_steps(hr) if config else hr)
    else:
        width, height = p.width, p.height
        texts, negatives = p.prompts, p.negative_prompts
        distilled = getattr(p, "distilled_cfg_scale", None)
        config = sd_samplers.find_sampler_config(p.sampler_name)
        steps, hires_steps = (config.total_steps(p.steps) if config else p.steps), None
    prompts = sd_conditioning(prompt_parser, texts, width=width, height=height, distilled=distilled)
    negative = sd_conditioning(prompt_parser, negatives, width=width, height=height, distilled=distilled,
                               negative=True)
    need_uncond = has_uncond and state.settings.recenter > 0
    n = len(state.branches)

    def encode(rows: list, name: str):
        with text_pass_kept(shared.sd_model), torch.no_grad(), devices.autocast(), router.route(rows):
            c, uc = learned_conditioning(prompt_parser, shared.sd_model, prompts, negative, steps, hires_steps,
                                         use_old, need_uncond)
        if not _finite(c.batch if hasattr(c, "batch") else c):
            note(state, f"the text encoder with {name} gave non-finite conditioning; its branch uses the "
                        "base prompt conditioning")
            return None
        if uc is not None and not _finite(uc):
            note(state, f"the text encoder with {name} gave non-finite conditioning for the negative prompt; "
                        "its branch uses the base negative conditioning")
            uc = None
        return c, uc

    out = []
    for j, branch in enumerate(state.branches):
        rows: list = [None] * n
        rows[j] = slice(0, None)
        out.append(encode(rows, branch.name) if branch.te else None)
    merged = None
    if state.composer is not None and state.composer.needs_merged(list(range(n))):
        merged = encode([slice(0, None) if b.te else None for b in state.branches], "every LoRA")
    return out, merged


# -- memory --------------------------------------------------------------------------------------


def _adapter_bytes(state: GenerationState, dtype: torch.dtype) -> int:
    """Bytes the routed UNet/DiT adapters take on the device in the model's compute dtype."""
    size = torch.tensor([], dtype=dtype).element_size()
    total = 0
    for b in state.branches:
        for entry in b.unet.values():
            for piece in pieces(entry):
                inner = piece.inner if isinstance(piece, OutputSlice) else piece
                tensors = ([inner.down, inner.up, inner.mid] if isinstance(inner, LowRank)
                           else [inner.delta_tensor, inner.bias])
                total += sum(t.numel() * size for t in tensors if t is not None)
    return total


def _peak_estimator(unet, ctx: PassContext, n_branches: int) -> Callable:
    """Forge sizes the model's share of GPU memory for a ``[2B, C, H, W]`` call; branch calls are larger."""
    previous = unet.model_options.get("memory_peak_estimation_modifier", unet.memory_required)

    def estimate(shape):
        # the base rows and every branch's rows in one call (at most max-rows rows when that is set)
        rows = int(shape[0]) * (1 + n_branches)
        if ctx.max_rows > 0:
            rows = max(int(shape[0]), min(rows, ctx.max_rows))
        return previous([rows, *shape[1:]])

    return estimate


def install_pass(p, state: GenerationState, has_uncond: bool) -> PassContext:
    """Clone Forge's UNet patcher for this sampling pass and register the LoRAtorio step on the clone."""
    source = p.sd_model.forge_objects.unet
    unet = source.clone()
    ctx = PassContext(state=state, p=p, max_rows=int(state.settings.max_rows_per_call or 0),
                      source_unet=source, unet=unet)
    ctx.texts, ctx.merged_text = _pass_texts(p, state, has_uncond)
    unet.add_conditioning_modifier(make_scale_recorder(ctx))
    ctx.post_cfg = make_post_cfg(ctx)
    unet.set_model_sampler_post_cfg_function(ctx.post_cfg)
    if hasattr(unet, "add_extra_preserved_memory_during_sampling"):
        # the routed factors sit on the device next to the model while it samples
        unet.add_extra_preserved_memory_during_sampling(
            _adapter_bytes(state, compute_dtype(unet.model)))
    if hasattr(unet, "set_memory_peak_estimation_modifier"):
        unet.set_memory_peak_estimation_modifier(_peak_estimator(unet, ctx, len(state.branches)))
    old = state.extra.get("pass")
    if old is not None:
        old.closed = True
    state.extra["pass"] = ctx
    p.sd_model.forge_objects.unet = unet
    return ctx


def _pass_texts(p, state: GenerationState, has_uncond: bool) -> tuple[list, tuple | None]:
    """Branch text conds of this pass, computed once (Forge calls the hook twice around a hires pass)."""
    key = (getattr(p, "iteration", 0), bool(getattr(p, "is_hr_pass", False)), has_uncond)
    cached = state.extra.get("texts")
    if cached is not None and cached[0] == key:
        return cached[1]
    texts = branch_texts(p, state, has_uncond)
    state.extra["texts"] = (key, texts)
    return texts
