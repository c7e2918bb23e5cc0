"""Fake of ``backend/memory_management.py``: free memory is a knob the tests turn.

``FREE_MEMORY`` is what :func:`get_free_memory` reports; a test lowers it to make
``calc_cond_uncond_batch`` split cond and uncond into separate calls as Forge does under
memory pressure. ``LOADS`` records every ``load_models_gpu`` call.
"""

from __future__ import annotations

import torch

FREE_MEMORY = float(1 << 40)
LOADS: list[dict] = []
signal_empty_cache = False


def get_free_memory(dev=None, torch_free_too=False):
    return FREE_MEMORY


def soft_empty_cache(force=False):
    global signal_empty_cache
    signal_empty_cache = False


def dtype_size(dtype):
    return torch.tensor([], dtype=dtype).element_size()


def cast_to_device(tensor, device, dtype, copy=False):
    return tensor.to(device=device, dtype=dtype, copy=copy)


def load_models_gpu(models, memory_required=0, hard_memory_preservation=0):
    """Loading a patcher merges its LoRA patches (``memory_management.py:518``)."""
    LOADS.append({"models": list(models), "memory_required": memory_required,
                  "hard_memory_preservation": hard_memory_preservation})
    for m in models:
        m.refresh_loras()


def load_model_gpu(model):
    return load_models_gpu([model])
