"""Fake of ``modules/sd_samplers_common.py``."""

from __future__ import annotations

from collections import namedtuple


class InterruptedException(BaseException):
    pass


class SamplerData(namedtuple("SamplerData", ["name", "constructor", "aliases", "options"])):
    def total_steps(self, steps):
        # second-order samplers declare two model calls per step (sd_samplers_common.py:17-21)
        return steps * 2 if self.options.get("second_order", False) else steps
