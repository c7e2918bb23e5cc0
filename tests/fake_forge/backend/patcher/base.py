"""Fake of ``backend/patcher/base.py``: ``ModelPatcher``.

``clone`` shares the model and deep-copies ``model_options`` (``base.py:79-84``);
``add_patches`` keeps patches for existing parameters only and keys them by
``(filename, strength_patch, strength_model, online_mode)`` (``:91-117``);
``refresh_loras`` merges them into the shared weights through the one ``LoraLoader`` of
the model (``:63-66, 125-127``).
"""

from __future__ import annotations

import copy

from .. import memory_management
from .lora import LoraLoader


class ModelPatcher:
    def __init__(self, model, load_device=None, offload_device=None, size=0, current_device=None, **kwargs):
        self.size = size
        self.model = model
        self.lora_patches = {}
        self.object_patches = {}
        self.model_options = {"transformer_options": {}}
        self.load_device = load_device
        self.offload_device = offload_device
        self.current_device = current_device if current_device is not None else offload_device
        if not hasattr(model, "lora_loader"):
            model.lora_loader = LoraLoader(model)
        self.lora_loader = model.lora_loader

    def clone(self):
        n = ModelPatcher(self.model, self.load_device, self.offload_device, self.size, self.current_device)
        n.lora_patches = self.lora_patches.copy()
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        return n

    def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0, online_mode=False):
        model_keys = {k for k, _ in self.model.named_parameters()}
        accepted, these = set(), {}
        for k in patches:
            if isinstance(k, str):
                key, offset, function = k, None, None
            else:
                key, offset, function = k[0], k[1], (k[2] if len(k) > 2 else None)
            if key in model_keys:
                accepted.add(k)
                these.setdefault(key, []).append([strength_patch, patches[k], strength_model, offset, function])
        self.lora_patches[(filename, strength_patch, strength_model, online_mode)] = these
        return accepted

    def has_online_lora(self):
        return any(online for (_, _, _, online) in self.lora_patches)

    def refresh_loras(self):
        self.lora_loader.refresh(self.lora_patches)

    def memory_required(self, input_shape):
        return self.model.memory_required(input_shape=input_shape)

    def model_dtype(self):
        return self.model.computation_dtype

    def set_model_sampler_cfg_function(self, fn, disable_cfg1_optimization=False):
        self.model_options["sampler_cfg_function"] = fn
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_sampler_post_cfg_function(self, fn, disable_cfg1_optimization=False):
        self.model_options["sampler_post_cfg_function"] = [*self.model_options.get("sampler_post_cfg_function", []), fn]
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_sampler_pre_cfg_function(self, fn, disable_cfg1_optimization=False):
        self.model_options["sampler_pre_cfg_function"] = [*self.model_options.get("sampler_pre_cfg_function", []), fn]
        if disable_cfg1_optimization:
            self.model_options["disable_cfg1_optimization"] = True

    def set_model_unet_function_wrapper(self, fn):
        self.model_options["model_function_wrapper"] = fn


def load_patcher(patcher):
    memory_management.load_models_gpu([patcher])
