"""Fake ``modules.processing``: the generation loop with the WebUI's hook order.

``process_images``: ``before_process``; ``setup_prompts``; ``process``; per batch:
``before_process_batch`` -> parse extra networks -> ``extra_networks.activate`` (which
fires ``after_extra_networks_activate``) -> ``process_batch`` -> ``setup_conds`` (with the
WebUI's conditioning cache, shared across processing objects and keyed on the
extra-network data) -> ``sample`` (hires fix: re-activation with the hires networks, hires
conds, a new sampler for ``sample_img2img``) -> decode -> ``postprocess_batch`` -> per
image ``postprocess_image`` and infotext; then ``deactivate``, the result (which takes
``p.comments``) and ``postprocess``.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from . import extra_networks, infotext_utils, prompt_parser, sd_samplers, shared


class PostprocessImageArgs:
    def __init__(self, image):
        self.image = image


class Processed:
    """The result. As in the WebUI (``processing.py:517-525``), ``p.comments`` are copied here
    when it is built, before the scripts' ``postprocess`` (``:1137-1148``): the UI shows
    ``comments`` (``txt2img.py:120``), the API returns ``js()`` (``api/api.py:490``)."""

    def __init__(self, p, images, infotexts, latents):
        self.images = images
        self.infotexts = infotexts
        self.info = infotexts[0] if infotexts else ""
        self.index_of_first_image = 0
        self.latents = latents
        self.comments = "".join(f"{c}\n" for c in p.comments)
        self.extra_generation_params = p.extra_generation_params

    def js(self):
        return json.dumps({"infotexts": self.infotexts, "extra_generation_params": self.extra_generation_params,
                           "index_of_first_image": self.index_of_first_image}, default=lambda o: None)


def _noise(seeds, shape):
    noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    return noise.to(shared.sd_model.alphas_cumprod.device)


class StableDiffusionProcessing:
    # class attributes on purpose: the WebUI's conditioning cache is shared by all processing objects
    cached_uc = [None, None]  # noqa: RUF012
    cached_c = [None, None]  # noqa: RUF012

    def __init__(self, prompt="", negative_prompt="", seed=1, steps=4, cfg_scale=5.0, width=32, height=32,
                 batch_size=1, n_iter=1, sampler_name="Euler", s_min_uncond=0.0, scripts=None, script_args=(),
                 disable_extra_networks=False, refiner_checkpoint_info=None, denoising_strength=0.6):
        self.prompt, self.negative_prompt, self.seed = prompt, negative_prompt, seed
        self.steps, self.cfg_scale, self.width, self.height = steps, cfg_scale, width, height
        self.batch_size, self.n_iter, self.sampler_name = batch_size, n_iter, sampler_name
        self.s_min_uncond = s_min_uncond
        self.scripts, self.script_args = scripts, tuple(script_args)
        self.disable_extra_networks = disable_extra_networks
        self.refiner_checkpoint_info = refiner_checkpoint_info
        self.denoising_strength = denoising_strength
        self.extra_generation_params = {}
        self.comments = {}
        self.is_hr_pass = False
        self.iteration = 0
        self.sd_model = shared.sd_model
        self.sampler = None
        self.c = self.uc = None
        self.extra_network_data = None

    def comment(self, text):
        self.comments[text] = 1

    def setup_prompts(self):
        n = self.batch_size * self.n_iter
        self.all_prompts = list(self.prompt) if isinstance(self.prompt, list) else [self.prompt] * n
        neg = self.negative_prompt
        self.all_negative_prompts = list(neg) if isinstance(neg, list) else [neg] * n
        self.all_seeds = [self.seed + i for i in range(n)]
        self.all_subseeds = list(self.all_seeds)

    def cached_params(self, required_prompts, steps, extra_network_data, hires_steps=None):
        return (required_prompts, steps, hires_steps, shared.sd_model.sd_checkpoint_info, extra_network_data,
                self.width, self.height)

    def get_conds_with_caching(self, function, required_prompts, steps, caches, extra_network_data, hires_steps=None):
        params = self.cached_params(required_prompts, steps, extra_network_data, hires_steps)
        for cache in caches:
            if cache[0] is not None and params == cache[0]:
                return cache[1]
        cache = caches[0]
        cache[1] = function(shared.sd_model, required_prompts, steps, hires_steps, False)
        cache[0] = params
        return cache[1]

    def setup_conds(self):
        prompts = prompt_parser.SdConditioning(self.prompts, width=self.width, height=self.height)
        negative = prompt_parser.SdConditioning(self.negative_prompts, width=self.width, height=self.height,
                                                is_negative_prompt=True)
        config = sd_samplers.find_sampler_config(self.sampler_name)
        total = config.total_steps(self.steps)
        self.step_multiplier = total // self.steps
        self.firstpass_steps = total
        self.uc = self.get_conds_with_caching(prompt_parser.get_learned_conditioning, negative, total,
                                              [self.cached_uc], self.extra_network_data)
        self.c = self.get_conds_with_caching(prompt_parser.get_multicond_learned_conditioning, prompts, total,
                                             [self.cached_c], self.extra_network_data)

    def get_conds(self):
        return self.c, self.uc

    def parse_extra_network_prompts(self):
        self.prompts, self.extra_network_data = extra_networks.parse_prompts(self.prompts)

    def image_conditioning(self, n):
        return torch.zeros(n, 5, 1, 1, device=shared.sd_model.alphas_cumprod.device)


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    cached_hr_uc = [None, None]  # noqa: RUF012
    cached_hr_c = [None, None]  # noqa: RUF012

    def __init__(self, enable_hr=False, hr_scale=2.0, hr_second_pass_steps=0, hr_prompt="", hr_negative_prompt="",
                 hr_sampler_name=None, **kwargs):
        super().__init__(**kwargs)
        self.enable_hr, self.hr_scale, self.hr_second_pass_steps = enable_hr, hr_scale, hr_second_pass_steps
        self.hr_prompt, self.hr_negative_prompt, self.hr_sampler_name = hr_prompt, hr_negative_prompt, hr_sampler_name
        self.hr_c = self.hr_uc = None
        self.hr_upscale_to_x = int(self.width * hr_scale)
        self.hr_upscale_to_y = int(self.height * hr_scale)

    def setup_prompts(self):
        super().setup_prompts()
        if self.enable_hr:
            self.all_hr_prompts = [self.hr_prompt or p for p in self.all_prompts]
            self.all_hr_negative_prompts = [self.hr_negative_prompt or p for p in self.all_negative_prompts]

    def parse_extra_network_prompts(self):
        super().parse_extra_network_prompts()
        if self.enable_hr:
            n, bs = self.iteration, self.batch_size
            self.hr_prompts = self.all_hr_prompts[n * bs:(n + 1) * bs]
            self.hr_negative_prompts = self.all_hr_negative_prompts[n * bs:(n + 1) * bs]
            self.hr_prompts, self.hr_extra_network_data = extra_networks.parse_prompts(self.hr_prompts)

    def calculate_hr_conds(self):
        if self.hr_c is not None:
            return
        prompts = prompt_parser.SdConditioning(self.hr_prompts, width=self.hr_upscale_to_x,
                                               height=self.hr_upscale_to_y)
        negative = prompt_parser.SdConditioning(self.hr_negative_prompts, width=self.hr_upscale_to_x,
                                                height=self.hr_upscale_to_y, is_negative_prompt=True)
        config = sd_samplers.find_sampler_config(self.hr_sampler_name or self.sampler_name)
        steps = self.hr_second_pass_steps or self.steps
        total = config.total_steps(steps)
        self.hr_uc = self.get_conds_with_caching(prompt_parser.get_learned_conditioning, negative,
                                                 self.firstpass_steps, [self.cached_hr_uc, self.cached_uc],
                                                 self.hr_extra_network_data, total)
        self.hr_c = self.get_conds_with_caching(prompt_parser.get_multicond_learned_conditioning, prompts,
                                                self.firstpass_steps, [self.cached_hr_c, self.cached_c],
                                                self.hr_extra_network_data, total)

    def setup_conds(self):
        super().setup_conds()
        self.hr_c = self.hr_uc = None

    def get_conds(self):
        if self.is_hr_pass:
            return self.hr_c, self.hr_uc
        return super().get_conds()

    def sample(self, conditioning, unconditional_conditioning, seeds):
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        h, w = self.height // 8, self.width // 8
        x = _noise(seeds, (4, h, w))
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=x, noise=x, c=conditioning,
                                                       uc=unconditional_conditioning)
        samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning,
                                      image_conditioning=self.image_conditioning(x.shape[0]))
        if not self.enable_hr or shared.state.interrupted:
            return samples
        self.is_hr_pass = True
        try:
            self.sampler = sd_samplers.create_sampler(self.hr_sampler_name or self.sampler_name, self.sd_model)
            samples = torch.nn.functional.interpolate(samples, size=(self.hr_upscale_to_y // 8,
                                                                     self.hr_upscale_to_x // 8), mode="nearest")
            noise = _noise([s + 1000 for s in seeds], samples.shape[1:])
            if not self.disable_extra_networks:
                extra_networks.activate(self, self.hr_extra_network_data)
            self.calculate_hr_conds()
            if self.scripts is not None:
                self.scripts.process_before_every_sampling(self, x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)
            samples = self.sampler.sample_img2img(self, samples, noise, self.hr_c, self.hr_uc,
                                                  steps=self.hr_second_pass_steps or self.steps,
                                                  image_conditioning=self.image_conditioning(samples.shape[0]))
        finally:
            self.is_hr_pass = False
        return samples


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    def __init__(self, init_latent=None, **kwargs):
        super().__init__(**kwargs)
        self.init_latent = init_latent

    def sample(self, conditioning, unconditional_conditioning, seeds):
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        noise = _noise(seeds, self.init_latent.shape[1:])
        x = self.init_latent.to(noise.device).expand(len(seeds), -1, -1, -1).clone()
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=x, noise=noise, c=conditioning,
                                                       uc=unconditional_conditioning)
        return self.sampler.sample_img2img(self, x, noise, conditioning, unconditional_conditioning,
                                           image_conditioning=self.image_conditioning(x.shape[0]))


def create_infotext(p, index):
    params = {"Steps": p.steps, "Sampler": p.sampler_name, "CFG scale": p.cfg_scale, "Seed": p.all_seeds[index],
              "Size": f"{p.width}x{p.height}"}
    params.update({k: v for k, v in p.extra_generation_params.items() if not callable(v)})
    negative = p.all_negative_prompts[index]
    lines = [p.all_prompts[index]]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    lines.append(infotext_utils.create_parameters_line(params))
    return "\n".join(lines)


def _to_images(decoded):
    arr = ((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in arr]


def process_images(p):
    shared.state.begin()
    if p.scripts is not None:
        p.scripts.before_process(p)
    return process_images_inner(p)


def process_images_inner(p):
    p.setup_prompts()
    if p.scripts is not None:
        p.scripts.process(p)
    output_images, infotexts, latents = [], [], []
    with torch.no_grad():
        for n in range(p.n_iter):
            p.iteration = n
            if shared.state.interrupted:
                break
            bs = p.batch_size
            p.prompts = p.all_prompts[n * bs:(n + 1) * bs]
            p.negative_prompts = p.all_negative_prompts[n * bs:(n + 1) * bs]
            p.seeds = p.all_seeds[n * bs:(n + 1) * bs]
            p.subseeds = p.all_subseeds[n * bs:(n + 1) * bs]
            if p.scripts is not None:
                p.scripts.before_process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds,
                                               subseeds=p.subseeds)
            p.parse_extra_network_prompts()
            if not p.disable_extra_networks:
                extra_networks.activate(p, p.extra_network_data)
            if p.scripts is not None:
                p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)
            p.setup_conds()
            samples = p.sample(conditioning=p.c, unconditional_conditioning=p.uc, seeds=p.seeds)
            latents.append(samples)
            images = _to_images(shared.sd_model.decode_first_stage(samples))
            if p.scripts is not None:
                p.scripts.postprocess_batch(p, images, batch_number=n)
            p.prompts = p.all_prompts[n * bs:(n + 1) * bs]
            for i, image in enumerate(images):
                pp = PostprocessImageArgs(image)
                if p.scripts is not None:
                    p.scripts.postprocess_image(p, pp)
                text = create_infotext(p, n * bs + i)
                pp.image.info["parameters"] = text
                output_images.append(pp.image)
                infotexts.append(text)
    if not infotexts:
        infotexts.append(create_infotext(p, 0))
    if not p.disable_extra_networks and p.extra_network_data:
        extra_networks.deactivate(p, p.extra_network_data)
    res = Processed(p, output_images, infotexts, torch.cat(latents) if latents else None)
    if p.scripts is not None:
        p.scripts.postprocess(p, res)
    return res
