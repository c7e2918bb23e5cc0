"""Tiny SD1.5-, SDXL- and Flux-shaped engines with Forge's ``forge_objects`` layout.

``forge_objects`` / ``forge_objects_original`` / ``forge_objects_after_applying_lora``
(``backend/diffusion_engine/base.py``), ``get_learned_conditioning`` loading the text
encoders through the memory manager first (``sd15.py:63-67``) and returning a tensor
(SD1.5), ``{crossattn, vector}`` (SDXL) or ``{crossattn, vector, guidance}`` (Flux dev,
``flux.py:84-97``).
"""

from __future__ import annotations

import torch

from .. import memory_management
from ..modules.k_model import KModel
from ..modules.k_prediction import PredictionEps, PredictionFlux
from ..nn.flux import TinyFlux
from ..nn.text import TinyClip, TinyT5, tokenize
from ..nn.unet import TinyUNet
from ..patcher.clip import CLIP
from ..patcher.unet import UnetPatcher
from ..text_processing import classic_engine


class ForgeObjects:
    def __init__(self, unet, clip, vae, clipvision=None):
        self.unet, self.clip, self.vae, self.clipvision = unet, clip, vae, clipvision

    def shallow_copy(self):
        return ForgeObjects(self.unet, self.clip, self.vae, self.clipvision)


class _Vae:
    def __init__(self, latent_channels):
        self.latent_channels = latent_channels


class _CheckpointInfo:
    def __init__(self, name):
        self.name = self.title = self.filename = name
        self.sha256 = name


class FakeEngine:
    def __init__(self, kind="sd15", seed=0, in_channels=None):
        torch.manual_seed(seed)
        self.kind = kind
        self.is_sd1 = kind == "sd15"
        self.is_sdxl = kind == "sdxl"
        self.is_sd2 = self.is_sd3 = False
        self.use_distilled_cfg_scale = kind == "flux"
        self.current_lora_hash = str([])
        self.extra_generation_params = {}
        self.sd_checkpoint_info = _CheckpointInfo(f"tiny-{kind}-{seed}")
        if kind == "sd15":
            encoders = {"clip_l": TinyClip(24)}
            net = TinyUNet(in_channels=in_channels or 4, context_dim=24)
            model = KModel(net, PredictionEps(), "runwayml/stable-diffusion-v1-5")
            latent = 4
        elif kind == "sdxl":
            encoders = {"clip_l": TinyClip(24), "clip_g": TinyClip(24)}
            net = TinyUNet(in_channels=in_channels or 4, context_dim=48, linear_proj=True, adm_in=24)
            model = KModel(net, PredictionEps(), "stabilityai/stable-diffusion-xl-base-1.0")
            latent = 4
        elif kind == "flux":
            encoders = {"clip_l": TinyClip(16), "t5xxl": TinyT5(24)}
            net = TinyFlux(in_channels=16, context_dim=24, vec_dim=16)
            model = KModel(net, PredictionFlux(), "black-forest-labs/FLUX.1-dev")
            latent = 16
        else:
            raise ValueError(kind)
        for m in (*encoders.values(), net):
            m.eval().requires_grad_(False)
        clip = CLIP(model_dict=encoders)
        unet = UnetPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))
        self.text_encoders = clip.cond_stage_model  # the modules every CLIP clone shares
        self.forge_objects = ForgeObjects(unet, clip, _Vae(latent))
        self.forge_objects_original = self.forge_objects.shallow_copy()
        self.forge_objects_after_applying_lora = self.forge_objects.shallow_copy()

    def is_webui_legacy_model(self):
        return self.is_sd1 or self.is_sdxl

    def set_clip_skip(self, clip_skip):
        pass

    @torch.inference_mode()
    def get_learned_conditioning(self, prompt):
        memory_management.load_model_gpu(self.forge_objects.clip.patcher)
        ids = tokenize(list(prompt))
        classic_engine.last_extra_generation_params["Emphasis"] = "Original"
        enc = self.text_encoders
        if self.kind == "sd15":
            return enc["clip_l"](ids)[0]
        if self.kind == "sdxl":
            h_l, _ = enc["clip_l"](ids)
            h_g, pooled = enc["clip_g"](ids)
            return {"crossattn": torch.cat([h_l, h_g], -1), "vector": pooled}
        _, pooled = enc["clip_l"](ids)
        cond = {"crossattn": enc["t5xxl"](ids), "vector": pooled}
        scale = getattr(prompt, "distilled_cfg_scale", 3.5) or 3.5
        cond["guidance"] = torch.FloatTensor([scale] * len(prompt))
        return cond
