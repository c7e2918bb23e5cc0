"""Fake of ``backend/patcher/clip.py``: the text encoders behind one patcher; clones share the modules."""

from __future__ import annotations

import torch

from .base import ModelPatcher


class JointTextEncoder(torch.nn.ModuleDict):
    pass


class CLIP:
    def __init__(self, model_dict=None, tokenizer_dict=None, no_init=False):
        if no_init:
            return
        self.cond_stage_model = JointTextEncoder(model_dict or {})
        self.tokenizer = dict(tokenizer_dict or {})
        self.patcher = ModelPatcher(self.cond_stage_model)

    def clone(self):
        n = CLIP(no_init=True)
        n.patcher = self.patcher.clone()
        n.cond_stage_model = self.cond_stage_model
        n.tokenizer = self.tokenizer
        return n

    def add_patches(self, *args, **kwargs):
        return self.patcher.add_patches(*args, **kwargs)
