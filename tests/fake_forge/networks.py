"""Fake of the built-in LoRA extension's ``networks`` module (``extensions-builtin/sd_forge_lora``).

``load_networks`` restarts from ``forge_objects_original`` and adds each file's patches
to clones of the UNet and CLIP patchers (``networks.py:15-53, 68-127``); the result
becomes ``forge_objects_after_applying_lora``. Nothing is merged until a patcher is
loaded (``refresh_loras``). A hash of the requested files and multipliers skips the work
when nothing changed.
"""

from __future__ import annotations

import hashlib
import os

from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet
from backend.utils import load_torch_file
from modules import shared

available_networks: dict = {}
available_network_aliases: dict = {}
forbidden_network_aliases: dict = {}
loaded_networks: list = []
LOADS: list = []  # (names, te, unet) of every load_networks call that rebuilt the patchers


class NetworkOnDisk:
    def __init__(self, name, filename):
        self.name = self.alias = name
        self.filename = filename
        with open(filename, "rb") as f:
            self.shorthash = hashlib.sha256(f.read()).hexdigest()[:12]

    def read_hash(self):
        pass

    def get_alias(self):
        return self.alias


class Network:
    def __init__(self, name, network_on_disk):
        self.name = name
        self.network_on_disk = network_on_disk
        self.mentioned_name = None


def list_available_networks():
    available_networks.clear()
    available_network_aliases.clear()
    folder = shared.cmd_opts.lora_dir
    if not folder or not os.path.isdir(folder):
        return
    for fn in sorted(os.listdir(folder)):
        if not fn.endswith((".safetensors", ".pt", ".ckpt")):
            continue
        name = os.path.splitext(fn)[0]
        entry = NetworkOnDisk(name, os.path.join(folder, fn))
        available_networks[name] = entry
        available_network_aliases[name] = entry


def load_lora_for_models(model, clip, lora, strength_model, strength_clip, filename="default"):
    unet_keys = model_lora_keys_unet(model.model, {})
    clip_keys = model_lora_keys_clip(clip.cond_stage_model, {})
    lora_unet, rest = load_lora(lora, unet_keys)
    lora_clip, rest = load_lora(rest, clip_keys)
    if len(rest) > 12:
        return model, clip
    new_model, new_clip = model.clone(), clip.clone()
    if lora_unet:
        new_model.add_patches(filename=filename, patches=lora_unet, strength_patch=strength_model)
        model = new_model
    if lora_clip:
        new_clip.add_patches(filename=filename, patches=lora_clip, strength_patch=strength_clip)
        clip = new_clip
    return model, clip


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    sd = shared.sd_model
    loaded_networks.clear()
    if any(available_network_aliases.get(n) is None for n in names):
        list_available_networks()
    on_disk = [available_network_aliases.get(n) for n in names]
    for entry, name in zip(on_disk, names):
        if entry is None:
            # the real loop dies on an unknown name (networks.py:92-96: load_network(None) raises, and so does
            # the error report that reads None.filename); the built-in's activate call fails with it
            raise AttributeError("'NoneType' object has no attribute 'filename'")
        net = Network(name, entry)
        net.mentioned_name = name
        loaded_networks.append(net)
    targets = [[e.filename, u, t, False] for e, u, t in zip(on_disk, unet_multipliers, te_multipliers) if e]
    if sd.current_lora_hash == str(targets):
        return
    sd.current_lora_hash = str(targets)
    LOADS.append((list(names), list(te_multipliers), list(unet_multipliers)))
    sd.forge_objects.unet = sd.forge_objects_original.unet
    sd.forge_objects.clip = sd.forge_objects_original.clip
    for filename, unet_m, te_m, _ in targets:
        sd.forge_objects.unet, sd.forge_objects.clip = load_lora_for_models(
            sd.forge_objects.unet, sd.forge_objects.clip, load_torch_file(filename), unet_m, te_m, filename)
    sd.forge_objects_after_applying_lora = sd.forge_objects.shallow_copy()
