"""Fake of ``backend/utils.py``: attribute paths and state-dict loading."""

from __future__ import annotations

import os

import torch
from safetensors.torch import load_file


def _load(path, device):
    if str(path).endswith(".safetensors"):
        return load_file(str(path), device=str(device or "cpu"))
    return torch.load(path, map_location=device or "cpu", weights_only=True)


def load_torch_file(path, safe_load=False, device=None):
    """As Forge's patched loader (``modules_forge/patch_basic.py:35-54``): an unreadable file is renamed to
    ``*.corrupted`` and the error comes back as a ValueError of several lines."""
    try:
        return _load(path, device)
    except Exception as e:
        exp = str(e) + "\n"
        path = str(path)
        if os.path.exists(path):
            exp += f"File corrupted: {path} \n"
            os.replace(path, path + ".corrupted")
            exp += f"Forge has tried to move the corrupted file to {path}.corrupted \n"
            exp += "You may try again now and Forge will download models again. \n"
        raise ValueError(exp) from e


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
