"""Fake of ``backend/utils.py``: attribute paths and state-dict loading."""

from __future__ import annotations

import torch
from safetensors.torch import load_file


def load_torch_file(path, safe_load=False, device=None):
    if str(path).endswith(".safetensors"):
        return load_file(str(path), device=str(device or "cpu"))
    return torch.load(path, map_location=device or "cpu", weights_only=True)


def get_attr(obj, attr):
    for name in attr.split("."):
        obj = getattr(obj, name)
    return obj


def get_attr_with_parent(obj, attr):
    """``(parent, last name, value)`` of a dotted path, as ``backend/utils.py:79-86`` returns."""
    parent, name = obj, None
    for name in attr.split("."):
        parent = obj
        obj = getattr(obj, name)
    return parent, name, obj


def set_attr_raw(obj, attr, value):
    names = attr.split(".")
    for name in names[:-1]:
        obj = getattr(obj, name)
    setattr(obj, names[-1], value)
