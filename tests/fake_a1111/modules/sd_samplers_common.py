"""Fake ``modules.sd_samplers_common``: sampler base with the WebUI's step bookkeeping."""

from __future__ import annotations

from . import shared


class InterruptedException(BaseException):
    pass


class SamplerData:
    def __init__(self, name, constructor, aliases=(), options=None):
        self.name, self.constructor, self.aliases = name, constructor, aliases
        self.options = options or {}

    def total_steps(self, steps):
        return steps * 2 if self.options.get("second_order", False) else steps


class Sampler:
    def __init__(self, funcname):
        self.funcname = funcname
        self.p = None
        self.model_wrap_cfg = None
        self.sampler_extra_args = None
        self.last_latent = None
        self.s_min_uncond = None
        self.config = None
        self.stop_at = None

    def callback_state(self, d):
        # the WebUI sets the step index after each step (so the next step's calls still see the previous one)
        shared.state.sampling_step = d["i"]

    def launch_sampling(self, steps, func):
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = self.config.total_steps(steps)
        shared.state.sampling_steps = steps
        shared.state.sampling_step = 0
        try:
            return func()
        except InterruptedException:
            return self.last_latent

    def initialize(self, p):
        self.p = p
        self.model_wrap_cfg.p = p
        self.model_wrap_cfg.mask = getattr(p, "mask", None)
        self.model_wrap_cfg.nmask = getattr(p, "nmask", None)
        self.model_wrap_cfg.step = 0
        self.model_wrap_cfg.image_cfg_scale = getattr(p, "image_cfg_scale", None)
        self.s_min_uncond = getattr(p, "s_min_uncond", 0.0)
        return {}
