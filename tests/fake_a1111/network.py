"""Fake of the built-in Lora extension's ``network`` / ``network_lora`` / ``network_hada`` objects.

Shapes and attributes as the host adapter reads them (``extensions-builtin/Lora``,
A1111 1.10.1): ``Network.modules[compvis_key]`` holds a module object with
``network``, ``network_key``, ``sd_key``, ``sd_module``, ``alpha``, ``dim``, ``scale``,
``dora_scale``, ``multiplier()`` (te multiplier when ``'transformer'`` is in the first 20
characters of ``sd_key``), ``calc_scale()``, ``calc_updown(orig_weight)`` returning the
full delta times scale and multiplier; LoRA modules also carry ``up_model`` /
``down_model`` / ``mid_model`` (``nn.Linear`` or ``nn.Conv2d``, float32, CPU), conv down
models with the target's kernel, stride and padding.
"""

from __future__ import annotations

import hashlib
import os

import torch
from torch import nn


class NetworkOnDisk:
    def __init__(self, name: str, filename: str):
        self.name = name
        self.filename = filename
        self.alias = name
        with open(filename, "rb") as f:
            self.hash = hashlib.sha256(f.read()).hexdigest()
        self.shorthash = self.hash[:12]

    def read_hash(self):
        return self.shorthash

    def get_alias(self):
        return self.alias


class Network:
    def __init__(self, name, network_on_disk):
        self.name = name
        self.network_on_disk = network_on_disk
        self.te_multiplier = 1.0
        self.unet_multiplier = 1.0
        self.dyn_dim = None
        self.modules = {}
        self.bundle_embeddings = {}
        self.mtime = None
        self.mentioned_name = None


class NetworkWeights:
    def __init__(self, network_key, sd_key, w, sd_module):
        self.network_key = network_key
        self.sd_key = sd_key
        self.w = w
        self.sd_module = sd_module


class NetworkModule:
    def __init__(self, net: Network, weights: NetworkWeights):
        self.network = net
        self.network_key = weights.network_key
        self.sd_key = weights.sd_key
        self.sd_module = weights.sd_module
        if isinstance(self.sd_module, nn.MultiheadAttention):
            self.shape = self.sd_module.out_proj.weight.shape
        else:
            self.shape = self.sd_module.weight.shape
        self.dim = None
        self.bias = weights.w.get("bias")
        self.alpha = weights.w["alpha"].item() if "alpha" in weights.w else None
        self.scale = weights.w["scale"].item() if "scale" in weights.w else None
        self.dora_scale = weights.w.get("dora_scale", None)

    def multiplier(self):
        if "transformer" in self.sd_key[:20]:
            return self.network.te_multiplier
        return self.network.unet_multiplier

    def calc_scale(self):
        if self.scale is not None:
            return self.scale
        if self.dim is not None and self.alpha is not None:
            return self.alpha / self.dim
        return 1.0

    def finalize_updown(self, updown, orig_weight, output_shape):
        updown = updown.reshape(output_shape)
        if orig_weight.numel() == updown.numel():
            updown = updown.reshape(orig_weight.shape)
        return updown * self.calc_scale() * self.multiplier(), None


class NetworkModuleLora(NetworkModule):
    def __init__(self, net, weights):
        super().__init__(net, weights)
        self.up_model = self._layer(weights.w, "lora_up.weight")
        self.down_model = self._layer(weights.w, "lora_down.weight")
        self.mid_model = self._layer(weights.w, "lora_mid.weight", none_ok=True)
        self.dim = weights.w["lora_down.weight"].shape[0]

    def _layer(self, w, key, none_ok=False):
        weight = w.get(key)
        if weight is None and none_ok:
            return None
        target = self.sd_module
        if isinstance(target, (nn.Linear, nn.MultiheadAttention)):
            weight = weight.reshape(weight.shape[0], -1)
            layer = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        elif isinstance(target, nn.Conv2d) and key == "lora_down.weight":
            if weight.dim() == 2:
                weight = weight.reshape(weight.shape[0], -1, 1, 1)
            if weight.shape[2:] != (1, 1):
                layer = nn.Conv2d(weight.shape[1], weight.shape[0], target.kernel_size, target.stride,
                                  target.padding, bias=False)
            else:
                layer = nn.Conv2d(weight.shape[1], weight.shape[0], (1, 1), bias=False)
        elif isinstance(target, nn.Conv2d):
            if weight.dim() == 2:
                weight = weight.reshape(weight.shape[0], -1, 1, 1)
            layer = nn.Conv2d(weight.shape[1], weight.shape[0], (1, 1), bias=False)
        else:
            raise AssertionError(f"Lora layer {self.network_key} matched a layer with unsupported type: "
                                 f"{type(target).__name__}")
        with torch.no_grad():
            layer.weight.copy_(weight.reshape(layer.weight.shape))
        layer.to(device="cpu", dtype=torch.float32)
        layer.weight.requires_grad_(False)
        return layer

    def calc_updown(self, orig_weight):
        up = self.up_model.weight.to(orig_weight.device)
        down = self.down_model.weight.to(orig_weight.device)
        output_shape = [up.size(0), down.size(1)]
        if down.dim() == 4:
            output_shape += down.shape[2:]
        dyn = self.network.dyn_dim
        if dyn is not None:
            up, down = up[:, :dyn], down[:dyn]
        updown = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
        return self.finalize_updown(updown, orig_weight, output_shape)


class NetworkModuleHada(NetworkModule):
    def __init__(self, net, weights):
        super().__init__(net, weights)
        self.w1a, self.w1b = weights.w["hada_w1_a"], weights.w["hada_w1_b"]
        self.w2a, self.w2b = weights.w["hada_w2_a"], weights.w["hada_w2_b"]
        self.dim = self.w1b.shape[0]

    def calc_updown(self, orig_weight):
        w1 = self.w1a.float() @ self.w1b.float()
        w2 = self.w2a.float() @ self.w2b.float()
        updown = (w1 * w2).to(orig_weight.device)
        output_shape = [self.w1a.shape[0], self.w1b.shape[1]]
        if isinstance(self.sd_module, nn.Conv2d):
            output_shape = list(orig_weight.shape)
        return self.finalize_updown(updown, orig_weight, output_shape)


def create_module(net, weights):
    keys = set(weights.w)
    if {"lora_up.weight", "lora_down.weight"} <= keys:
        return NetworkModuleLora(net, weights)
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= keys:
        return NetworkModuleHada(net, weights)
    return None


def mtime(filename):
    return os.path.getmtime(filename)
