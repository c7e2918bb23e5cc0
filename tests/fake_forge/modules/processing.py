"""Fake of ``modules/processing.py``: one generation with Forge's hook order.

Per batch (``processing.py:937-1000``): ``forge_objects`` reset to the original,
``before_process_batch``, extra-network parsing and activation (which ends with
``after_extra_networks_activate``), ``forge_objects`` set to the after-LoRA copy,
``process_batch``, ``setup_conds``, ``sample()``. Inside ``sample()`` the UNet is reset
again and ``process_before_every_sampling`` runs right before the sampler (``:1373-1377``);
a hires pass re-activates the extra networks, calls ``process_before_every_sampling``
twice with a reset in between (``:1501-1526``) and samples img2img-style. Images are the
final latents rendered to small RGB pictures (no VAE).
"""

from __future__ import annotations

import inspect
import json

import numpy as np
import torch
from PIL import Image

from . import extra_networks, prompt_parser, sd_samplers, shared
from .scripts import PostprocessBatchListArgs, PostprocessImageArgs, PostSampleArgs


def _take_text_engine_params(sd_model):
    """As ``get_conds_with_caching`` does: move the text engine's infotext entries to the model, reset them."""
    from backend.text_processing import classic_engine

    sd_model.extra_generation_params.update(classic_engine.last_extra_generation_params)
    classic_engine.last_extra_generation_params = {}



def _conditioning(texts, distilled_cfg_scale=None, **kwargs):
    """``SdConditioning`` as the processing code builds it; forks whose class has no distilled scale leave it out."""
    if "distilled_cfg_scale" in inspect.signature(prompt_parser.SdConditioning.__init__).parameters:
        kwargs["distilled_cfg_scale"] = distilled_cfg_scale
    return prompt_parser.SdConditioning(texts, **kwargs)

class Processed:
    """The result. As in Forge (``processing.py:519-528``), ``p.comments`` are copied here when
    it is built, before the scripts' ``postprocess`` (``:1144-1156``): the UI shows ``comments``
    (``txt2img.py:142``), the API returns ``js()`` (``api/api.py:504``)."""

    def __init__(self, p, images, latents, infotexts):
        self.images = images
        self.latents = latents
        self.infotexts = infotexts
        self.info = infotexts[0] if infotexts else ""
        self.comments = "".join(f"{c}\n" for c in p.comments)
        self.extra_generation_params = dict(p.extra_generation_params)
        self.index_of_first_image = 0

    def js(self):
        return json.dumps({"infotexts": self.infotexts, "extra_generation_params": self.extra_generation_params,
                           "index_of_first_image": self.index_of_first_image}, default=lambda o: None)


def latent_to_image(latent):
    a = latent[:3].float()
    a = (a - a.min()) / (a.max() - a.min() + 1e-8) * 255
    arr = a.permute(1, 2, 0).round().to(torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(arr), "RGB").resize((latent.shape[2] * 8, latent.shape[1] * 8))


class StableDiffusionProcessing:
    def __init__(self, sd_model, prompt="", negative_prompt="", seed=0, steps=4, cfg_scale=7.0, width=64, height=64,
                 batch_size=1, n_iter=1, sampler_name="Euler", scripts=None, script_args=(),
                 distilled_cfg_scale=3.5, disable_extra_networks=False):
        self.sd_model = sd_model
        self.prompt, self.negative_prompt = prompt, negative_prompt
        self.seed, self.steps, self.cfg_scale = seed, steps, cfg_scale
        self.width, self.height = width, height
        self.batch_size, self.n_iter = batch_size, n_iter
        self.sampler_name = sampler_name
        self.scripts = scripts
        self.script_args = list(script_args)
        self.distilled_cfg_scale = distilled_cfg_scale
        self.disable_extra_networks = disable_extra_networks
        self.extra_generation_params = {}
        self.comments = {}  # a dict used as an ordered set, as in Forge
        self.is_hr_pass = False
        self.iteration = 0
        self.sampler = None
        self.modified_noise = None
        self.refiner_checkpoint = None
        self.extra_network_data = {}
        self.subseeds = [0]
        self.c = self.uc = None
        self.cached_c = [None, None]
        self.cached_uc = [None, None]

    def comment(self, text):
        self.comments[text] = 1

    def setup_prompts(self):
        n = self.batch_size * self.n_iter
        self.all_prompts = self.prompt if isinstance(self.prompt, list) else [self.prompt] * n
        self.all_negative_prompts = (self.negative_prompt if isinstance(self.negative_prompt, list)
                                     else [self.negative_prompt] * n)
        self.all_seeds = [self.seed + i for i in range(n)]
        self.main_prompt = self.all_prompts[0]

    def parse_extra_network_prompts(self):
        self.prompts, self.extra_network_data = extra_networks.parse_prompts(self.prompts)

    def setup_conds(self):
        prompts = _conditioning(self.prompts, width=self.width, height=self.height,
                                distilled_cfg_scale=self.distilled_cfg_scale)
        negatives = _conditioning(self.negative_prompts, width=self.width, height=self.height,
                                  is_negative_prompt=True, distilled_cfg_scale=self.distilled_cfg_scale)
        config = sd_samplers.find_sampler_config(self.sampler_name)
        total = config.total_steps(self.steps)
        self.firstpass_steps = total
        self.uc = None if self.cfg_scale == 1 else prompt_parser.get_learned_conditioning(
            self.sd_model, negatives, total)
        self.c = prompt_parser.get_multicond_learned_conditioning(self.sd_model, prompts, total)
        _take_text_engine_params(self.sd_model)

    def noise(self):
        latent = self.sd_model.forge_objects.vae.latent_channels
        gens = [torch.Generator().manual_seed(s) for s in self.seeds]
        return torch.stack([torch.randn(latent, self.height // 8, self.width // 8, generator=g) for g in gens])

    def infotext(self):
        items = ", ".join(f"{k}: {v}" for k, v in self.extra_generation_params.items())
        return f"{self.main_prompt}\nSteps: {self.steps}, CFG scale: {self.cfg_scale}" + (f", {items}" if items else "")


class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    def __init__(self, *args, enable_hr=False, hr_scale=2.0, hr_second_pass_steps=0, denoising_strength=0.6,
                 hr_cfg=None, hr_prompt="", hr_negative_prompt="", **kwargs):
        super().__init__(*args, **kwargs)
        self.enable_hr, self.hr_scale = enable_hr, hr_scale
        self.hr_second_pass_steps, self.denoising_strength = hr_second_pass_steps, denoising_strength
        self.hr_cfg = hr_cfg if hr_cfg is not None else self.cfg_scale
        self.hr_prompt, self.hr_negative_prompt = hr_prompt, hr_negative_prompt
        self.hr_sampler_name = None
        self.hr_distilled_cfg = self.distilled_cfg_scale
        self.hr_c = self.hr_uc = None

    def setup_prompts(self):
        super().setup_prompts()
        if self.enable_hr:
            n = self.batch_size * self.n_iter
            self.all_hr_prompts = [self.hr_prompt or self.prompt] * n
            self.all_hr_negative_prompts = [self.hr_negative_prompt or self.negative_prompt] * n

    def parse_extra_network_prompts(self):
        super().parse_extra_network_prompts()
        if self.enable_hr:
            self.hr_prompts, self.hr_extra_network_data = extra_networks.parse_prompts(self.hr_prompts)

    def calculate_hr_conds(self):
        self.hr_upscale_to_x, self.hr_upscale_to_y = int(self.width * self.hr_scale), int(self.height * self.hr_scale)
        prompts = _conditioning(self.hr_prompts, width=self.hr_upscale_to_x, height=self.hr_upscale_to_y,
                                distilled_cfg_scale=self.hr_distilled_cfg)
        negatives = _conditioning(self.hr_negative_prompts, width=self.hr_upscale_to_x, height=self.hr_upscale_to_y,
                                  is_negative_prompt=True, distilled_cfg_scale=self.hr_distilled_cfg)
        config = sd_samplers.find_sampler_config(self.hr_sampler_name or self.sampler_name)
        total = config.total_steps(self.hr_second_pass_steps or self.steps)
        self.hr_uc = None if self.hr_cfg == 1 else prompt_parser.get_learned_conditioning(
            self.sd_model, negatives, self.firstpass_steps, total)
        self.hr_c = prompt_parser.get_multicond_learned_conditioning(self.sd_model, prompts, self.firstpass_steps,
                                                                     total)
        _take_text_engine_params(self.sd_model)

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        x = self.noise()
        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=x, noise=x, c=conditioning,
                                                       uc=unconditional_conditioning)
        samples = self.sampler.sample(self, x, conditioning, unconditional_conditioning)
        if not self.enable_hr:
            return samples
        return self.sample_hr_pass(samples)

    def sample_hr_pass(self, samples):
        self.is_hr_pass = True
        samples = torch.nn.functional.interpolate(samples, scale_factor=self.hr_scale, mode="nearest")
        self.sampler = sd_samplers.create_sampler(self.hr_sampler_name or self.sampler_name, self.sd_model)
        gens = [torch.Generator().manual_seed(s + 1000) for s in self.seeds]
        noise = torch.stack([torch.randn(samples.shape[1:], generator=g) for g in gens])
        if not self.disable_extra_networks:
            extra_networks.activate(self, self.hr_extra_network_data)
        self.calculate_hr_conds()
        if self.scripts is not None:
            self.scripts.before_hr(self)
            self.scripts.process_before_every_sampling(self, x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)
        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)
        samples = self.sampler.sample_img2img(self, samples, noise, self.hr_c, self.hr_uc,
                                              steps=self.hr_second_pass_steps or self.steps)
        self.is_hr_pass = False
        return samples


class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    def __init__(self, *args, init_latent=None, denoising_strength=0.6, image_conditioning=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_latent = init_latent
        self.denoising_strength = denoising_strength
        self.image_conditioning = image_conditioning

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        noise = self.noise()
        self.sd_model.forge_objects = self.sd_model.forge_objects_after_applying_lora.shallow_copy()
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(self, x=self.init_latent, noise=noise, c=conditioning,
                                                       uc=unconditional_conditioning)
        return self.sampler.sample_img2img(self, self.init_latent, noise, conditioning, unconditional_conditioning,
                                           image_conditioning=self.image_conditioning)


def process_images(p):
    shared.state.interrupted = shared.state.skipped = False
    p.setup_prompts()
    if p.scripts is not None:
        p.scripts.before_process(p)
        p.scripts.process(p)
    images, latents, infotexts = [], [], []
    for n in range(p.n_iter):
        p.iteration = n
        # as the WebUI's loop: a skip ends with its batch, an interrupt ends the job before the next batch
        if shared.state.skipped:
            shared.state.skipped = False
        if shared.state.interrupted:
            break
        sl = slice(n * p.batch_size, (n + 1) * p.batch_size)
        p.prompts, p.negative_prompts = p.all_prompts[sl], p.all_negative_prompts[sl]
        p.seeds = p.all_seeds[sl]
        if getattr(p, "enable_hr", False):
            p.hr_prompts = p.all_hr_prompts[sl]
            p.hr_negative_prompts = p.all_hr_negative_prompts[sl]
        p.sd_model.forge_objects = p.sd_model.forge_objects_original.shallow_copy()
        if p.scripts is not None:
            p.scripts.before_process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds,
                                           subseeds=p.subseeds)
        p.parse_extra_network_prompts()
        if not p.disable_extra_networks:
            extra_networks.activate(p, p.extra_network_data)
        p.sd_model.forge_objects = p.sd_model.forge_objects_after_applying_lora.shallow_copy()
        if p.scripts is not None:
            p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)
        p.setup_conds()
        samples = p.sample(conditioning=p.c, unconditional_conditioning=p.uc, seeds=p.seeds,
                           subseeds=p.subseeds, subseed_strength=0.0, prompts=p.prompts)
        if p.scripts is not None:
            ps = PostSampleArgs(samples)
            p.scripts.post_sample(p, ps)
            samples = ps.samples
            p.scripts.postprocess_batch(p, samples, batch_number=n)
        batch_images = [latent_to_image(s) for s in samples]
        if p.scripts is not None:
            pp = PostprocessBatchListArgs(batch_images)
            p.scripts.postprocess_batch_list(p, pp, batch_number=n)
            batch_images = pp.images
        for i, img in enumerate(batch_images):
            if p.scripts is not None:
                ppi = PostprocessImageArgs(img)
                p.scripts.postprocess_image(p, ppi)
                img = ppi.image
            images.append(img)
            latents.append(samples[i] if i < len(samples) else None)
            infotexts.append(p.infotext())
    if not p.disable_extra_networks:
        extra_networks.deactivate(p, p.extra_network_data)
    processed = Processed(p, images, latents, infotexts)
    if p.scripts is not None:
        p.scripts.postprocess(p, processed)
    return processed
