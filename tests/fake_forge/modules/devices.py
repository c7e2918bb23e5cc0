"""Fake of ``modules/devices.py``."""

from __future__ import annotations

import contextlib

import torch

cpu = torch.device("cpu")
device = cpu
dtype = torch.float32


def autocast(disable=False):
    return contextlib.nullcontext()


def torch_gc():
    pass
