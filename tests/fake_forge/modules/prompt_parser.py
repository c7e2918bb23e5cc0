"""Fake of ``modules/prompt_parser.py``: schedules, AND, and their reconstruction per model call.

Supports prompt editing ``[from:to:when]`` (``when`` a step count, or a fraction of the
steps) and ``AND`` with an optional ``:weight``. Conditioning objects have the WebUI's
shapes: a list per prompt of ``ScheduledPromptConditioning(end_at_step, cond)``, and
``MulticondLearnedConditioning(shape, batch)`` whose ``batch`` holds per image a list of
``ComposableScheduledPromptConditioning(schedules, weight)``.
"""

from __future__ import annotations

import re
from collections import namedtuple

import torch

ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])
ComposableScheduledPromptConditioning = namedtuple("ComposableScheduledPromptConditioning", ["schedules", "weight"])
MulticondLearnedConditioning = namedtuple("MulticondLearnedConditioning", ["shape", "batch"])

_EDIT = re.compile(r"\[([^:\]]*):([^:\]]*):([0-9.]+)\]")
_AND = re.compile(r"\bAND\b")
_WEIGHT = re.compile(r"^(.*?)(?::\s*([-+]?[0-9.]+))?\s*$", re.S)


class SdConditioning(list):
    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None,
                 distilled_cfg_scale=None):
        super().__init__()
        self.extend(prompts)
        copy_from = copy_from if copy_from is not None else prompts
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, "is_negative_prompt", False)
        self.width = width or getattr(copy_from, "width", None)
        self.height = height or getattr(copy_from, "height", None)
        self.distilled_cfg_scale = distilled_cfg_scale or getattr(copy_from, "distilled_cfg_scale", None)


class DictWithShape(dict):
    def __init__(self, x, shape=None):
        super().__init__()
        self.update(x)

    @property
    def shape(self):
        return self["crossattn"].shape

    def advanced_indexing(self, item):
        return DictWithShape({k: v[item] for k, v in self.items()})


def _schedule(prompt, steps):
    """``[(end_at_step, text), ...]`` for one prompt."""
    m = _EDIT.search(prompt)
    if m is None:
        return [(steps, prompt)]
    when = float(m.group(3))
    at = int(when * steps) if when < 1 else int(when)
    before = prompt[:m.start()] + m.group(1) + prompt[m.end():]
    after = prompt[:m.start()] + m.group(2) + prompt[m.end():]
    return [(at, before), (steps, after)]


def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    return _learned_conditioning(model, prompts, steps, hires_steps)


def _learned_conditioning(model, prompts, steps, hires_steps):
    res = []
    cache = {}
    for prompt in prompts:
        schedule = _schedule(prompt, hires_steps or steps)
        texts = [t for _, t in schedule]
        key = tuple(texts)
        if key not in cache:
            conds = model.get_learned_conditioning(SdConditioning(texts, copy_from=prompts))
            out = []
            for i, (end, _) in enumerate(schedule):
                cond = {k: v[i] for k, v in conds.items()} if isinstance(conds, dict) else conds[i]
                out.append(ScheduledPromptConditioning(end, cond))
            cache[key] = out
        res.append(cache[key])
    return res


def _split_and(prompt):
    parts = []
    for sub in _AND.split(prompt):
        m = _WEIGHT.match(sub)
        text, weight = m.group(1).strip(), float(m.group(2)) if m.group(2) else 1.0
        parts.append((text, weight))
    return parts


def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    flat, indexes = [], []
    for prompt in prompts:
        mine = []
        for text, weight in _split_and(prompt):
            mine.append((len(flat), weight))
            flat.append(text)
        indexes.append(mine)
    learned = _learned_conditioning(model, SdConditioning(flat, copy_from=prompts), steps, hires_steps)
    batch = [[ComposableScheduledPromptConditioning(learned[i], w) for i, w in mine] for mine in indexes]
    return MulticondLearnedConditioning(shape=(len(prompts),), batch=batch)


def _pick(schedules, step):
    for entry in schedules:
        if step <= entry.end_at_step:
            return entry.cond
    return schedules[-1].cond


def _stack(conds):
    if isinstance(conds[0], dict):
        return DictWithShape({k: torch.stack([c[k] for c in conds]) for k in conds[0]})
    return torch.stack(conds)


def reconstruct_cond_batch(c, current_step):
    return _stack([_pick(schedules, current_step) for schedules in c])


def reconstruct_multicond_batch(c, current_step):
    conds, conds_list = [], []
    for composables in c.batch:
        mine = []
        for composable in composables:
            mine.append((len(conds), composable.weight))
            conds.append(_pick(composable.schedules, current_step))
        conds_list.append(mine)
    return conds_list, _stack(conds)
