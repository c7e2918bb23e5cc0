"""Fake ``modules.sd_samplers_cfg_denoiser``: the CFG wrapper both sampler families use.

Same batch layout and callback protocol as the WebUI: ``x_in`` holds one row per
sub-prompt of each image (image-major), then one uncond row per image; ``cfg_denoiser``
callback fields are read back; uncond rows can be skipped (``s_min_uncond``); the model
is called once (``batch_cond_uncond``), in chunks of ``batch_size`` rows, or - when
cond and uncond token lengths differ - cond rows in chunks and uncond rows apart; the
``cfg_denoised`` callback sees ``x_out`` (only in-place edits count); then CFG.
"""

from __future__ import annotations

import torch

from . import prompt_parser, sd_samplers_common, shared
from .script_callbacks import (
    AfterCFGCallbackParams,
    CFGDenoisedParams,
    CFGDenoiserParams,
    cfg_after_cfg_callback,
    cfg_denoised_callback,
    cfg_denoiser_callback,
)

model_calls: list = []  # (rows, kind) of every inner-model call made by the denoiser, for tests


def catenate_conds(conds):
    if not isinstance(conds[0], dict):
        return torch.cat(conds)
    return {key: torch.cat([x[key] for x in conds]) for key in conds[0]}


def subscript_cond(cond, a, b):
    if not isinstance(cond, dict):
        return cond[a:b]
    return {key: vec[a:b] for key, vec in cond.items()}


class CFGDenoiser(torch.nn.Module):
    def __init__(self, sampler):
        super().__init__()
        self.model_wrap = None
        self.mask = None
        self.nmask = None
        self.init_latent = None
        self.steps = None
        self.total_steps = None
        self.step = 0
        self.image_cfg_scale = None
        self.mask_before_denoising = False
        self.p = None
        self.sampler = sampler

    @property
    def inner_model(self):
        raise NotImplementedError

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        denoised_uncond = x_out[-uncond.shape[0]:]
        denoised = torch.clone(denoised_uncond)
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
        return denoised

    def _call(self, x, sigma, cond, image_cond, kind):
        model_calls.append((x.shape[0], kind))
        if isinstance(cond, dict):  # SDXL
            return self.inner_model(x, sigma, cond={**cond, "c_concat": [image_cond]})
        return self.inner_model(x, sigma, cond={"c_crossattn": [cond], "c_concat": [image_cond]})

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        if shared.state.interrupted or shared.state.skipped:
            raise sd_samplers_common.InterruptedException
        conds_list, tensor = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step)
        if self.mask_before_denoising and self.mask is not None:
            x = x * self.nmask + self.init_latent * self.mask
        batch_size = len(conds_list)
        repeats = [len(c) for c in conds_list]
        x_in = torch.cat([torch.stack([x[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [x])
        sigma_in = torch.cat([torch.stack([sigma[i] for _ in range(n)]) for i, n in enumerate(repeats)] + [sigma])
        image_cond_in = torch.cat([torch.stack([image_cond[i] for _ in range(n)]) for i, n in enumerate(repeats)]
                                  + [image_cond])
        params = CFGDenoiserParams(x_in, image_cond_in, sigma_in, shared.state.sampling_step,
                                   shared.state.sampling_steps, tensor, uncond, self)
        cfg_denoiser_callback(params)
        x_in, image_cond_in, sigma_in = params.x, params.image_cond, params.sigma
        tensor, uncond = params.text_cond, params.text_uncond

        early = shared.opts.skip_early_cond != 0 and self.step / self.total_steps <= shared.opts.skip_early_cond
        ngms = (self.step % 2 or shared.opts.s_min_uncond_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond
        skip_uncond = bool(early or ngms)
        if skip_uncond:
            x_in = x_in[:-batch_size]
            sigma_in = sigma_in[:-batch_size]

        if tensor.shape[1] == uncond.shape[1] or skip_uncond:
            cond_in = tensor if skip_uncond else catenate_conds([tensor, uncond])
            if shared.opts.batch_cond_uncond:
                x_out = self._call(x_in, sigma_in, cond_in, image_cond_in, "main")
            else:
                x_out = torch.zeros_like(x_in)
                for a in range(0, x_out.shape[0], batch_size):
                    b = a + batch_size
                    x_out[a:b] = self._call(x_in[a:b], sigma_in[a:b], subscript_cond(cond_in, a, b),
                                            image_cond_in[a:b], "main-chunk")
        else:
            x_out = torch.zeros_like(x_in)
            step = batch_size * 2 if shared.opts.batch_cond_uncond else batch_size
            for a in range(0, tensor.shape[0], step):
                b = min(a + step, tensor.shape[0])
                x_out[a:b] = self._call(x_in[a:b], sigma_in[a:b], subscript_cond(tensor, a, b), image_cond_in[a:b],
                                        "main-cond")
            if not skip_uncond:
                n = uncond.shape[0]
                x_out[-n:] = self._call(x_in[-n:], sigma_in[-n:], uncond, image_cond_in[-n:], "main-uncond")

        first_rows = [c[0][0] for c in conds_list]
        if skip_uncond:
            x_out = torch.cat([x_out, torch.cat([x_out[i:i + 1] for i in first_rows])])

        cfg_denoised_callback(CFGDenoisedParams(x_out, shared.state.sampling_step, shared.state.sampling_steps,
                                                self.inner_model))
        if skip_uncond:
            denoised = self.combine_denoised(x_out, conds_list, uncond, 1.0)
        else:
            denoised = self.combine_denoised(x_out, conds_list, uncond, cond_scale)
        if not self.mask_before_denoising and self.mask is not None:
            denoised = denoised * self.nmask + self.init_latent * self.mask
        self.sampler.last_latent = torch.cat([x_out[i:i + 1] for i in first_rows])
        after = AfterCFGCallbackParams(denoised, shared.state.sampling_step, shared.state.sampling_steps)
        cfg_after_cfg_callback(after)
        self.step += 1
        return after.x
