"""Fake of ``backend/sampling/condition.py``: compiled conditions.

A compiled cond list holds one dict per AND part: ``model_conds`` maps the model's
keyword (``c_crossattn``, ``y``, ``guidance``, ``c_concat``) to a :class:`Condition`,
``strength`` is the AND weight (``condition.py:91-142``). ``process_cond`` repeats or
truncates a condition to the batch of the model call (``:5-10, 24-25``).
"""

from __future__ import annotations

import math

import torch


def repeat_to_batch_size(tensor, batch_size):
    if tensor.shape[0] == batch_size:
        return tensor
    if tensor.shape[0] > batch_size:
        return tensor[:batch_size]
    reps = math.ceil(batch_size / tensor.shape[0])
    return tensor.repeat(reps, *([1] * (tensor.dim() - 1)))[:batch_size]


class Condition:
    def __init__(self, cond):
        self.cond = cond

    def _copy_with(self, cond):
        return self.__class__(cond)

    def process_cond(self, batch_size, device, **kwargs):
        return self._copy_with(repeat_to_batch_size(self.cond, batch_size).to(device))

    def can_concat(self, other):
        return self.cond.shape == other.cond.shape

    def concat(self, others):
        return torch.cat([self.cond] + [o.cond for o in others])


class ConditionCrossAttn(Condition):
    """Token sequences of different lengths concatenate by repetition to their LCM (at most 4x)."""

    def can_concat(self, other):
        a, b = self.cond.shape, other.cond.shape
        if a == b:
            return True
        if a[0] != b[0] or a[2] != b[2]:
            return False
        lcm = a[1] * b[1] // math.gcd(a[1], b[1])
        return lcm // min(a[1], b[1]) <= 4

    def concat(self, others):
        conds = [self.cond] + [o.cond for o in others]
        length = 1
        for c in conds:
            length = length * c.shape[1] // math.gcd(length, c.shape[1])
        return torch.cat([c.repeat(1, length // c.shape[1], 1) for c in conds])


class ConditionConstant(Condition):
    def process_cond(self, batch_size, device, **kwargs):
        return self._copy_with(self.cond)

    def can_concat(self, other):
        return self.cond == other.cond

    def concat(self, others):
        return self.cond


def compile_conditions(cond):
    if cond is None:
        return None
    if isinstance(cond, torch.Tensor):
        return [dict(cross_attn=cond, model_conds=dict(c_crossattn=ConditionCrossAttn(cond)))]
    out = dict(cross_attn=cond["crossattn"], pooled_output=cond["vector"],
               model_conds=dict(c_crossattn=ConditionCrossAttn(cond["crossattn"]), y=Condition(cond["vector"])))
    if "guidance" in cond:
        out["model_conds"]["guidance"] = Condition(cond["guidance"])
    return [out]


def compile_weighted_conditions(cond, weights):
    """One compiled dict per AND position; ``weights`` is the per-image ``[(index, weight), ...]`` list."""
    results = []
    for position in zip(*weights):
        indices = [i for i, _ in position]
        weight = position[-1][1]
        feed = cond.advanced_indexing(indices) if hasattr(cond, "advanced_indexing") else cond[indices]
        part = compile_conditions(feed)
        part[0]["strength"] = weight
        results += part
    return results
