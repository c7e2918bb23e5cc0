"""Fake ``modules.sd_samplers_timesteps``: a DDIM sampler whose inner model returns *noise* (eps)."""

from __future__ import annotations

import torch

from . import sd_samplers_cfg_denoiser, sd_samplers_common, shared


class CompVisTimestepsDenoiser(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner_model = model

    def forward(self, input, timesteps, **kwargs):
        return self.inner_model.apply_model(input, timesteps, **kwargs)


class CFGDenoiserTimesteps(sd_samplers_cfg_denoiser.CFGDenoiser):
    def __init__(self, sampler):
        super().__init__(sampler)
        self.mask_before_denoising = True

    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = CompVisTimestepsDenoiser(shared.sd_model)
        return self.model_wrap


def ddim(model, x, timesteps, extra_args=None, callback=None):
    ac = shared.sd_model.alphas_cumprod
    s_in = x.new_ones([x.shape[0]])
    for i, t in enumerate(timesteps):
        prev = timesteps[i + 1] if i + 1 < len(timesteps) else None
        eps = model(x, t * s_in, **extra_args)
        a_t = ac[t]
        a_prev = ac[prev] if prev is not None else torch.tensor(1.0)
        pred_x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
        if callback is not None:
            callback({"x": x, "i": i, "denoised": pred_x0})
        x = a_prev.sqrt() * pred_x0 + (1 - a_prev).sqrt() * eps
    return x


class CompVisSampler(sd_samplers_common.Sampler):
    def __init__(self, funcname, sd_model):
        super().__init__(funcname)
        self.model_wrap_cfg = CFGDenoiserTimesteps(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def _extra(self, p, conditioning, unconditional_conditioning, image_conditioning) -> dict:
        self.sampler_extra_args = {"cond": conditioning, "image_cond": image_conditioning,
                                   "uncond": unconditional_conditioning, "cond_scale": p.cfg_scale,
                                   "s_min_uncond": self.s_min_uncond}
        return self.sampler_extra_args

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        timesteps = torch.linspace(999, 0, steps).round().long()
        self.initialize(p)
        self.last_latent = x
        extra = self._extra(p, conditioning, unconditional_conditioning, image_conditioning)
        return self.launch_sampling(steps, lambda: ddim(self.model_wrap_cfg, x, timesteps, extra_args=extra,
                                                        callback=self.callback_state))

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None,
                       image_conditioning=None):
        """The img2img / hires pass: noise the init latent to the first kept timestep, then DDIM from there."""
        steps = steps or p.steps
        t_enc = max(1, int(min(p.denoising_strength, 0.999) * steps))
        timesteps = torch.linspace(999, 0, steps).round().long()[steps - t_enc:]
        a_t = shared.sd_model.alphas_cumprod[timesteps[0]]
        xi = x * a_t.sqrt() + noise * (1 - a_t).sqrt()
        self.initialize(p)
        self.model_wrap_cfg.init_latent = x
        self.last_latent = x
        extra = self._extra(p, conditioning, unconditional_conditioning, image_conditioning)
        return self.launch_sampling(t_enc, lambda: ddim(self.model_wrap_cfg, xi, timesteps, extra_args=extra,
                                                        callback=self.callback_state))
