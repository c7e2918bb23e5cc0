"""Fake ``modules.sd_samplers``: the sampler list (Euler, Heun second-order, DDIM timesteps)."""

from __future__ import annotations

from . import sd_samplers_common, sd_samplers_kdiffusion, sd_samplers_timesteps

all_samplers = [
    sd_samplers_common.SamplerData("Euler", lambda model: sd_samplers_kdiffusion.KDiffusionSampler("Euler", model)),
    sd_samplers_common.SamplerData("Heun", lambda model: sd_samplers_kdiffusion.KDiffusionSampler("Heun", model),
                                   options={"second_order": True}),
    sd_samplers_common.SamplerData("DDIM", lambda model: sd_samplers_timesteps.CompVisSampler("ddim", model)),
]
all_samplers_map = {s.name: s for s in all_samplers}


def find_sampler_config(name):
    return all_samplers_map.get(name)


def create_sampler(name, model):
    config = find_sampler_config(name)
    sampler = config.constructor(model)
    sampler.config = config
    return sampler
