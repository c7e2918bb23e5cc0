"""Fake of the XYZ plot script module (``scripts/xyz_grid.py``): the axis registry."""

from __future__ import annotations

import copy


class AxisOption:
    def __init__(self, label, type, apply, format_value=None, confirm=None, cost=0.0, choices=None, prepare=None):
        self.label, self.type, self.apply, self.choices = label, type, apply, choices


def boolean_choice(reverse: bool = False):
    def choice():
        return ["False", "True"] if reverse else ["True", "False"]

    return choice


axis_options = [AxisOption("Nothing", str, lambda p, x, xs: None)]


def run_cell(p, option_values, process_images):
    """One grid cell: a shallow copy of ``p`` with each axis applied (values as typed strings)."""
    pc = copy.copy(p)
    for option, value in option_values:
        option.apply(pc, option.type(value), [])
    return process_images(pc)


class Script:
    pass


Script.__module__ = "xyz_grid.py"
