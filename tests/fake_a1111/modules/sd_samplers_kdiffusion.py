"""Fake ``modules.sd_samplers_kdiffusion``: CompVisDenoiser and Euler / Heun samplers.

The inner model returns the *denoised* estimate ``x - sigma * eps`` (k-diffusion's
``CompVisDenoiser``: input scaled by ``1 / sqrt(sigma^2 + 1)``, timestep from sigma).
"""

from __future__ import annotations

import torch

from . import sd_samplers_cfg_denoiser, sd_samplers_common, shared


class CompVisDenoiser(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.inner_model = model
        ac = model.alphas_cumprod
        self.register_buffer("sigmas", ((1 - ac) / ac) ** 0.5, persistent=False)
        self.register_buffer("log_sigmas", self.sigmas.log(), persistent=False)

    def sigma_to_t(self, sigma):
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        low = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        high = low + 1
        lo, hi = self.log_sigmas[low], self.log_sigmas[high]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * high).view(sigma.shape)

    def get_sigmas(self, n):
        smax, smin = self.sigmas[-1], self.sigmas[0]
        sig = torch.exp(torch.linspace(smax.log().item(), smin.log().item(), n, device=smax.device))
        return torch.cat([sig, sig.new_zeros([1])])

    def forward(self, input, sigma, **kwargs):
        c_in = 1 / (sigma**2 + 1) ** 0.5
        eps = self.inner_model.apply_model(input * c_in[:, None, None, None], self.sigma_to_t(sigma), **kwargs)
        return input - eps * sigma[:, None, None, None]


class CFGDenoiserKDiffusion(sd_samplers_cfg_denoiser.CFGDenoiser):
    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = CompVisDenoiser(shared.sd_model)
        return self.model_wrap


def sample_euler(model, x, sigmas, extra_args=None, callback=None):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = (x - denoised) / sigmas[i]
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
        x = x + d * (sigmas[i + 1] - sigmas[i])
    return x


def sample_heun(model, x, sigmas, extra_args=None, callback=None):
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        d = (x - denoised) / sigmas[i]
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "denoised": denoised})
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            denoised_2 = model(x_2, sigmas[i + 1] * s_in, **extra_args)
            d_2 = (x_2 - denoised_2) / sigmas[i + 1]
            x = x + (d + d_2) / 2 * dt
    return x


FUNCS = {"Euler": sample_euler, "Heun": sample_heun}


class KDiffusionSampler(sd_samplers_common.Sampler):
    def __init__(self, funcname, sd_model):
        super().__init__(funcname)
        self.func = FUNCS[funcname]
        self.model_wrap_cfg = CFGDenoiserKDiffusion(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def _extra(self, p, conditioning, unconditional_conditioning, image_conditioning):
        self.sampler_extra_args = {"cond": conditioning, "image_cond": image_conditioning,
                                   "uncond": unconditional_conditioning, "cond_scale": p.cfg_scale,
                                   "s_min_uncond": self.s_min_uncond}
        return self.sampler_extra_args

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        sigmas = self.model_wrap.get_sigmas(steps)
        x = x * sigmas[0]
        self.initialize(p)
        self.last_latent = x
        extra = self._extra(p, conditioning, unconditional_conditioning, image_conditioning)
        return self.launch_sampling(steps, lambda: self.func(self.model_wrap_cfg, x, sigmas, extra_args=extra,
                                                             callback=self.callback_state))

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None,
                       image_conditioning=None):
        steps = steps or p.steps
        t_enc = max(1, int(min(p.denoising_strength, 0.999) * steps))
        sigmas = self.model_wrap.get_sigmas(steps)
        sigma_sched = sigmas[steps - t_enc - 1:]
        xi = x + noise * sigma_sched[0]
        self.initialize(p)
        self.model_wrap_cfg.init_latent = x
        self.last_latent = x
        extra = self._extra(p, conditioning, unconditional_conditioning, image_conditioning)
        return self.launch_sampling(t_enc + 1, lambda: self.func(self.model_wrap_cfg, xi, sigma_sched,
                                                                 extra_args=extra, callback=self.callback_state))
