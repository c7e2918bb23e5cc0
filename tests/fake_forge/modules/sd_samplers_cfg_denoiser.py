"""Fake of ``modules/sd_samplers_cfg_denoiser.py`` and a k-diffusion-style sampler around it.

``CFGDenoiser.forward`` follows Forge's order (``:156-228``): reconstruct the conds for
the current model call (``self.step`` counts model calls), hires CFG, then
``sampling_function``, then ``self.step += 1``. The sampler calls the denoiser once per
step (Euler) or twice (Heun, second order), and its callback sets
``state.sampling_step`` after each step as ``callback_state`` does.
"""

from __future__ import annotations

import torch
from backend.sampling.sampling_function import sampling_cleanup, sampling_function, sampling_prepare

from . import prompt_parser
from .sd_samplers_common import InterruptedException, SamplerData
from .shared import state


class _Linker:
    def __init__(self, sd_model):
        self.inner_model = sd_model
        self.predictor = sd_model.forge_objects.unet.model.predictor


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser):
        self.x, self.image_cond, self.sigma = x, image_cond, sigma
        self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
        self.text_cond, self.text_uncond, self.denoiser = text_cond, text_uncond, denoiser


class CFGDenoiser(torch.nn.Module):
    def __init__(self, sampler):
        super().__init__()
        self.sampler = sampler
        self.step = 0
        self.steps = None
        self.total_steps = None
        self.p = None
        self.mask = None
        self.inner_model = None

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond=0.0, image_cond=None):
        if state.interrupted or state.skipped:
            raise InterruptedException
        composition, cond = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step) if uncond is not None else None
        params = CFGDenoiserParams(x, image_cond, sigma, state.sampling_step, state.sampling_steps, cond, uncond, self)
        if self.p.is_hr_pass:
            cond_scale = self.p.hr_cfg
        denoised, _cond_pred, _uncond_pred = sampling_function(self, params, cond_scale, composition)
        self.step += 1
        return denoised


SAMPLERS = {
    "Euler": SamplerData("Euler", "euler", ["k_euler"], {}),
    "Heun": SamplerData("Heun", "heun", ["k_heun"], {"second_order": True}),
}


def find_sampler_config(name):
    return SAMPLERS.get(name)


class Sampler:
    """Euler or Heun on a simple sigma schedule, with Forge's sampling_prepare / callback_state."""

    def __init__(self, name, sd_model):
        self.config = SAMPLERS[name]
        self.sd_model = sd_model
        self.model_wrap_cfg = CFGDenoiser(self)
        self.model_wrap_cfg.inner_model = _Linker(sd_model)
        self.last_latent = None

    def sigmas(self, steps):
        predictor = self.sd_model.forge_objects.unet.model.predictor
        if predictor.prediction_type == "const":
            return torch.cat([torch.linspace(1.0, 1.0 / steps, steps), torch.zeros(1)])
        return torch.cat([torch.exp(torch.linspace(torch.log(torch.tensor(14.6)), torch.log(torch.tensor(0.03)),
                                                   steps)), torch.zeros(1)])

    def _run(self, p, x, sigmas, cond, uncond, image_cond):
        denoiser = self.model_wrap_cfg
        denoiser.p = p
        steps = len(sigmas) - 1
        denoiser.steps = steps
        denoiser.total_steps = self.config.total_steps(steps)
        state.sampling_steps, state.sampling_step = steps, 0
        unet = self.sd_model.forge_objects.unet
        sampling_prepare(unet, x)
        ones = x.new_ones(x.shape[0])

        def model(xx, s):
            return denoiser(xx, s * ones, uncond=uncond, cond=cond, cond_scale=p.cfg_scale, image_cond=image_cond)

        try:
            for i in range(steps):
                s, s_next = sigmas[i], sigmas[i + 1]
                denoised = model(x, s)
                d = (x - denoised) / s
                if self.config.options.get("second_order") and s_next > 0:
                    x2 = x + d * (s_next - s)
                    d2 = (x2 - model(x2, s_next)) / s_next
                    x = x + (d + d2) / 2 * (s_next - s)
                else:
                    x = x + d * (s_next - s)
                state.sampling_step = i  # callback_state after the step
        except InterruptedException:  # launch_sampling returns what it has
            pass
        sampling_cleanup(unet)
        return x

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        sigmas = self.sigmas(steps or p.steps)
        predictor = self.sd_model.forge_objects.unet.model.predictor
        x = predictor.noise_scaling(sigmas[0], x, torch.zeros_like(x))
        return self._run(p, x, sigmas, conditioning, unconditional_conditioning, image_conditioning)

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None,
                       image_conditioning=None):
        steps = steps or p.steps
        t_enc = max(1, int(min(p.denoising_strength, 0.999) * steps))
        sigmas = self.sigmas(steps)[steps - t_enc - 1:]
        predictor = self.sd_model.forge_objects.unet.model.predictor
        xi = predictor.noise_scaling(sigmas[0], noise, x)
        return self._run(p, xi, sigmas, conditioning, unconditional_conditioning, image_conditioning)
