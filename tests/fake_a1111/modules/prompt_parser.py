"""Fake ``modules.prompt_parser``: schedules, AND sub-prompts and per-step reconstruction.

Supports ``[before:after:when]`` prompt editing (``when`` a step number, or a fraction of
the steps when below 1) and ``AND`` with ``:weight``. Conditionings are computed with
``model.get_learned_conditioning`` and cached only within one call, like the WebUI's.
"""

from __future__ import annotations

import re
from collections import namedtuple

import torch

ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])

_EDIT = re.compile(r"\[([^\[\]:]*):([^\[\]:]*):\s*([0-9.]+)\s*\]")
_AND_WEIGHT = re.compile(r"^(.*?)(?:\s*:\s*([-+]?[0-9.]+))?\s*$", re.S)


class DictWithShape(dict):
    """SDXL conditionings: a dict of tensors whose ``shape`` is the cross-attention one."""

    def __init__(self, x, shape=None):
        super().__init__()
        self.update(x)

    @property
    def shape(self):
        return self["crossattn"].shape


def _row(cond, i):
    if isinstance(cond, dict):
        return {k: v[i] for k, v in cond.items()}
    return cond[i]


def _stack(items):
    if isinstance(items[0], dict):
        return DictWithShape({k: torch.stack([it[k] for it in items]) for k in items[0]})
    return torch.stack(items)


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__()
        self.extend(prompts)
        if copy_from is None:
            copy_from = prompts
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, "is_negative_prompt", False)
        self.width = width or getattr(copy_from, "width", None)
        self.height = height or getattr(copy_from, "height", None)


def get_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    m = _EDIT.search(prompt)
    if m is None:
        return [(steps, prompt)]
    when = float(m.group(3))
    at = int(when * steps) if when < 1 else int(when)
    before = prompt[:m.start()] + m.group(1) + prompt[m.end():]
    after = prompt[:m.start()] + m.group(2) + prompt[m.end():]
    if at <= 0 or at >= steps:
        return [(steps, after if at <= 0 else before)]
    return [(at, before), (steps, after)]


def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    steps = hires_steps or steps
    cache = {}
    res = []
    for prompt in prompts:
        if prompt in cache:
            res.append(cache[prompt])
            continue
        schedule = get_schedule(prompt, steps)
        texts = SdConditioning([text for _, text in schedule], copy_from=prompts)
        conds = model.get_learned_conditioning(texts)
        item = [ScheduledPromptConditioning(end, _row(conds, i)) for i, (end, _) in enumerate(schedule)]
        cache[prompt] = item
        res.append(item)
    return res


class ComposableScheduledPromptConditioning:
    def __init__(self, schedules, weight=1.0):
        self.schedules = schedules
        self.weight = weight


class MulticondLearnedConditioning:
    def __init__(self, shape, batch):
        self.shape = shape
        self.batch = batch


def get_multicond_prompt_list(prompts):
    indexes, flat, lookup = [], [], {}
    for prompt in prompts:
        items = []
        for sub in re.split(r"\bAND\b", prompt):
            m = _AND_WEIGHT.match(sub)
            text, weight = m.group(1).strip(), float(m.group(2)) if m.group(2) is not None else 1.0
            if text not in lookup:
                lookup[text] = len(flat)
                flat.append(text)
            items.append((lookup[text], weight))
        indexes.append(items)
    return indexes, flat


def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    indexes, flat = get_multicond_prompt_list(prompts)
    learned = get_learned_conditioning(model, SdConditioning(flat, copy_from=prompts), steps, hires_steps,
                                       use_old_scheduling)
    batch = [[ComposableScheduledPromptConditioning(learned[i], w) for i, w in items] for items in indexes]
    return MulticondLearnedConditioning(shape=(len(prompts),), batch=batch)


def _at(schedules, step):
    for entry in schedules:
        if step <= entry.end_at_step:
            return entry.cond
    return schedules[-1].cond


def reconstruct_cond_batch(c, current_step):
    return _stack([_at(schedules, current_step) for schedules in c])


def reconstruct_multicond_batch(c: MulticondLearnedConditioning, current_step):
    tensors, conds_list = [], []
    for composables in c.batch:
        conds = []
        for comp in composables:
            conds.append((len(tensors), comp.weight))
            tensors.append(_at(comp.schedules, current_step))
        conds_list.append(conds)
    return conds_list, _stack(tensors)
