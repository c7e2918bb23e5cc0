"""Fake of the built-in Lora extension's ``networks`` module (A1111 1.10.1 behaviour).

- file list: ``available_networks`` (file stem), ``available_network_aliases``,
  ``forbidden_network_aliases``; ``list_available_networks()`` scans ``lora_dir``;
- ``load_network(name, on_disk)``: reads the safetensors file and groups keys by layer;
  layer keys map to ``shared.sd_model.network_layer_mapping`` (``lora_unet_`` ->
  ``diffusion_model_``, ``lora_te_`` -> the text-encoder name), ``..._q_proj`` of a
  ``MultiheadAttention`` falls back to the attention module; unmatched keys are skipped;
- ``load_networks``: clears and refills ``loaded_networks`` with multipliers;
- ``network_apply_weights(module)``: the lazy merge every patched layer runs before its
  forward: when the wanted set differs from what is merged, restore the backup, then
  add each loaded network's delta (q/k/v/out of attention modules included).
"""

from __future__ import annotations

import os
import re

import torch
from safetensors.torch import load_file
from torch import nn

from . import network

lora_dir: str | None = None
available_networks: dict = {}
available_network_aliases: dict = {}
forbidden_network_aliases: dict = {}
loaded_networks: list = []
networks_in_memory: dict = {}
load_calls: list = []  # names passed to load_network, for tests

re_x_proj = re.compile(r"(.*)_([qkv]_proj)$")


def reset():
    global lora_dir
    lora_dir = None
    available_networks.clear()
    available_network_aliases.clear()
    forbidden_network_aliases.clear()
    loaded_networks.clear()
    networks_in_memory.clear()
    load_calls.clear()


def list_available_networks():
    available_networks.clear()
    available_network_aliases.clear()
    forbidden_network_aliases.clear()
    forbidden_network_aliases.update({"none": 1, "addams": 1})
    if not lora_dir or not os.path.isdir(lora_dir):
        return
    for fn in sorted(os.listdir(lora_dir)):
        if not fn.endswith(".safetensors"):
            continue
        name = os.path.splitext(fn)[0]
        entry = network.NetworkOnDisk(name, os.path.join(lora_dir, fn))
        available_networks[name] = entry
        available_network_aliases[name] = entry


def update_available_networks_by_names(names):
    list_available_networks()


def assign_network_names_to_compvis_modules(sd_model):
    mapping = {}
    for prefix, wrapped in sd_model.text_encoders():
        for name, module in wrapped.named_modules():
            key = prefix + name.replace(".", "_")
            mapping[key] = module
            module.network_layer_name = key
    for name, module in sd_model.model.named_modules():
        key = name.replace(".", "_")
        mapping[key] = module
        module.network_layer_name = key
    sd_model.network_layer_mapping = mapping


def _convert(layer: str, mapping) -> str:
    if layer.startswith("lora_unet_"):
        return "diffusion_model_" + layer[len("lora_unet_"):]
    if layer.startswith("lora_te1_"):
        return "0_transformer_" + layer[len("lora_te1_"):]
    if layer.startswith("lora_te2_"):
        return "1_" + layer[len("lora_te2_"):]
    if layer.startswith("lora_te_"):
        rest = layer[len("lora_te_"):]
        return "transformer_" + rest if ("transformer_" + rest) in mapping or rest.startswith("text_model") else rest
    return layer


def load_network(name, network_on_disk):
    from modules import shared

    load_calls.append(name)
    net = network.Network(name, network_on_disk)
    net.mtime = os.path.getmtime(network_on_disk.filename)
    sd = load_file(network_on_disk.filename)
    model = shared.sd_model
    if not hasattr(model, "network_layer_mapping"):
        assign_network_names_to_compvis_modules(model)
    mapping = model.network_layer_mapping
    matched = {}
    for key_network, weight in sd.items():
        layer, _, part = key_network.partition(".")
        key = _convert(layer, mapping)
        sd_module = mapping.get(key)
        if sd_module is None:
            m = re_x_proj.match(key)
            if m:
                sd_module = mapping.get(m.group(1))
        if sd_module is None:
            continue
        matched.setdefault(key, network.NetworkWeights(key_network, key, {}, sd_module)).w[part] = weight
    for key, weights in matched.items():
        module = network.create_module(net, weights)
        if module is None:
            raise AssertionError(f"Could not find a module type that would accept those keys: {', '.join(weights.w)}")
        net.modules[key] = module
    return net


def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
    loaded_networks.clear()
    for i, name in enumerate(names):
        on_disk = available_network_aliases.get(name)
        if on_disk is None:
            continue
        net = networks_in_memory.get(name)
        if net is None or net.mtime != os.path.getmtime(on_disk.filename):
            net = load_network(name, on_disk)
        net.mentioned_name = name
        net.te_multiplier = te_multipliers[i] if te_multipliers else 1.0
        net.unet_multiplier = unet_multipliers[i] if unet_multipliers else 1.0
        net.dyn_dim = dyn_dims[i] if dyn_dims else None
        loaded_networks.append(net)
    networks_in_memory.clear()  # lora_in_memory_limit = 0


def _param(module):
    return module.in_proj_weight if isinstance(module, nn.MultiheadAttention) else module.weight


def network_apply_weights(module):
    layer = getattr(module, "network_layer_name", None)
    if layer is None:
        return
    wanted = tuple((n.name, n.te_multiplier, n.unet_multiplier, n.dyn_dim) for n in loaded_networks)
    current = getattr(module, "network_current_names", ())
    if current == wanted:
        return
    with torch.no_grad():
        backup = getattr(module, "network_weights_backup", None)
        out_proj = module.out_proj if isinstance(module, nn.MultiheadAttention) else None
        if backup is None and wanted:
            backup = (_param(module).detach().cpu().clone(),
                      out_proj.weight.detach().cpu().clone() if out_proj is not None else None)
            module.network_weights_backup = backup
        if backup is not None:
            _param(module).copy_(backup[0])
            if out_proj is not None:
                out_proj.weight.copy_(backup[1])
        for net in loaded_networks:
            if isinstance(module, nn.MultiheadAttention):
                size = module.embed_dim
                for i, suffix in enumerate(("_q_proj", "_k_proj", "_v_proj")):
                    m = net.modules.get(layer + suffix)
                    if m is not None:
                        delta, _ = m.calc_updown(module.in_proj_weight[i * size:(i + 1) * size])
                        module.in_proj_weight[i * size:(i + 1) * size] += delta.to(module.in_proj_weight.dtype)
                m = net.modules.get(layer + "_out_proj")
                if m is not None:
                    delta, _ = m.calc_updown(out_proj.weight)
                    out_proj.weight += delta.to(out_proj.weight.dtype)
                continue
            m = net.modules.get(layer)
            if m is not None:
                delta, _ = m.calc_updown(module.weight)
                module.weight += delta.reshape(module.weight.shape).to(module.weight.dtype)
    module.network_current_names = wanted
