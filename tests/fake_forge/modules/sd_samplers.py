"""Fake of ``modules/sd_samplers.py``."""

from .sd_samplers_cfg_denoiser import Sampler, find_sampler_config  # noqa: F401


def create_sampler(name, model):
    return Sampler(name, model)
