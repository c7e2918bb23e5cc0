"""A1111 adapter, per-branch text conditioning.

Each branch's conditioning is computed through the WebUI's prompt parser with that
LoRA's text-encoder adapters routed onto every row (packed attention projections merged
for the duration of the call and restored bit for bit), so prompt editing, AND, BREAK,
emphasis and SDXL's two encoders apply as they do for the base.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .generation import GenerationState
from .host_a1111_lora import A1111Bridge, _networks, _shared
from .loading import Branch
from .lora import delta_weight

# -- per-branch text conditioning -------------------------------------------------------------


def _settle_builtin(module) -> None:
    """Let the built-in Lora finish its own merge of ``module`` before a temporary merge.

    Its merge is lazy and restores from its own backup when the wanted set changes; a
    pending merge running inside our temporary one would make our restore wrong.
    """
    apply = getattr(_networks(), "network_apply_weights", None)
    if apply is not None and getattr(module, "network_layer_name", None):
        apply(module)


@contextlib.contextmanager
def _text_encoder_branch(branches: list[Branch], targets: Mapping[str, nn.Module]):
    """Route the text-encoder adapters of ``branches`` (one branch, or every branch for the merged row) onto
    every row; merge packed ones meanwhile."""
    from .routing import Router

    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for branch in branches:
            for name, entry in branch.te_merge.items():
                module = targets[name]
                owner = module
                if name.endswith("_out_proj"):
                    owner = targets.get(name[: -len("_out_proj")], module)
                _settle_builtin(owner)
                param = module.in_proj_weight if isinstance(module, nn.MultiheadAttention) else module.weight
                delta = delta_weight(entry, param.shape).to(param.device, param.dtype)
                saved.append((param, param.detach().clone()))
                with torch.no_grad():
                    param.add_(delta)
        routed = [b for b in branches if b.te]
        if routed:
            with Router(targets, [b.te for b in routed]).route([slice(0, None)] * len(routed)):
                yield
        else:
            yield
    finally:
        with torch.no_grad():
            for param, original in reversed(saved):
                param.copy_(original)


@dataclass
class PassConds:
    """Branch conditionings of one sampling pass (None: the branch uses the base conds)."""

    pass_id: str
    cond: list  # per branch: MulticondLearnedConditioning | None
    uncond: list  # per branch: list of schedules | None
    merged_cond: object = None  # the merged row's (every LoRA's text encoder), where the method uses that row
    merged_uncond: object = None


def _branch_conds(state: GenerationState, bridge: A1111Bridge, prompts, negative_prompts, width, height,
                  steps, hires_steps, pass_id) -> PassConds:
    from modules import devices, prompt_parser

    shared = _shared()
    use_old = bool(getattr(shared.opts, "use_old_scheduling", False))
    te_targets = bridge.te_targets()

    def encode(branches):
        if not state.settings.text_encoder_per_branch or not any(b.te or b.te_merge for b in branches):
            return None, None
        pos = prompt_parser.SdConditioning(list(prompts), width=width, height=height)
        neg = prompt_parser.SdConditioning(list(negative_prompts), width=width, height=height, is_negative_prompt=True)
        with torch.no_grad(), devices.autocast(), _text_encoder_branch(branches, te_targets):
            c = prompt_parser.get_multicond_learned_conditioning(shared.sd_model, pos, steps, hires_steps, use_old)
            uc = None
            if state.settings.recenter > 0:
                uc = prompt_parser.get_learned_conditioning(shared.sd_model, neg, steps, hires_steps, use_old)
        return c, uc

    own = [encode([branch]) for branch in state.branches]
    conds = PassConds(pass_id, [c for c, _ in own], [uc for _, uc in own])
    if state.composer is not None and state.composer.needs_merged(list(range(len(state.branches)))):
        conds.merged_cond, conds.merged_uncond = encode(state.branches)
    return conds


def first_pass_conds(p, state, bridge) -> PassConds:
    from modules import sd_samplers

    config = sd_samplers.find_sampler_config(p.sampler_name)
    total = config.total_steps(p.steps) if config else p.steps
    return _branch_conds(state, bridge, p.prompts, p.negative_prompts, p.width, p.height, total, None, "first")


def hires_conds(p, state, bridge) -> PassConds:
    from modules import sd_samplers

    config = sd_samplers.find_sampler_config(getattr(p, "hr_sampler_name", None) or p.sampler_name)
    steps = getattr(p, "hr_second_pass_steps", 0) or p.steps
    total = config.total_steps(steps) if config else steps
    first = getattr(p, "firstpass_steps", None) or p.steps
    return _branch_conds(state, bridge, p.hr_prompts, p.hr_negative_prompts, p.hr_upscale_to_x, p.hr_upscale_to_y,
                         first, total, "hr")
