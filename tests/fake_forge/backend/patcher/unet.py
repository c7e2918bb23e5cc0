"""Fake of ``backend/patcher/unet.py``: ``UnetPatcher`` and its sampling-time extras."""

from __future__ import annotations

import copy

from .base import ModelPatcher


class UnetPatcher(ModelPatcher):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.controlnet_linked_list = None
        self.extra_preserved_memory_during_sampling = 0
        self.extra_model_patchers_during_sampling = []
        self.extra_concat_condition = None

    def clone(self):
        n = UnetPatcher(self.model, self.load_device, self.offload_device, self.size, self.current_device)
        n.lora_patches = self.lora_patches.copy()
        n.object_patches = self.object_patches.copy()
        n.model_options = copy.deepcopy(self.model_options)
        n.controlnet_linked_list = self.controlnet_linked_list
        n.extra_preserved_memory_during_sampling = self.extra_preserved_memory_during_sampling
        n.extra_model_patchers_during_sampling = self.extra_model_patchers_during_sampling.copy()
        n.extra_concat_condition = self.extra_concat_condition
        return n

    def add_extra_preserved_memory_during_sampling(self, memory_in_bytes):
        self.extra_preserved_memory_during_sampling += memory_in_bytes

    def add_patched_controlnet(self, cnet):
        cnet.previous_controlnet = self.controlnet_linked_list
        self.controlnet_linked_list = cnet

    def append_model_option(self, k, v, ensure_uniqueness=False):
        self.model_options.setdefault(k, [])
        if ensure_uniqueness and v in self.model_options[k]:
            return
        self.model_options[k].append(v)

    def add_conditioning_modifier(self, modifier, ensure_uniqueness=False):
        self.append_model_option("conditioning_modifiers", modifier, ensure_uniqueness)

    def add_sampler_pre_cfg_function(self, modifier, ensure_uniqueness=False):
        self.append_model_option("sampler_pre_cfg_function", modifier, ensure_uniqueness)

    def set_memory_peak_estimation_modifier(self, modifier):
        self.model_options["memory_peak_estimation_modifier"] = modifier
