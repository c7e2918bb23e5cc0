"""A1111 adapter, LoRA files: the built-in Lora extension loads them, this module turns
its network modules into LoRAtorio adapters.

LoRA/LoCon factors become :class:`~loratorio.lora.LowRank` pieces; every other type
(LoHa, LoKr, IA3, OFT, full, norm) becomes the full delta the built-in's own
``calc_updown`` computes (:class:`~loratorio.lora.Dense`). Layer names are the ones the
built-in gives the model's modules (``network_layer_name``), so a file that works in the
user's WebUI maps the same way here.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .loading import HostBridge, LoadedLora, LoraFile, LoraLoadError, Reason
from .lora import Dense, LowRank, OutputSlice

__all__ = ["A1111Bridge", "convert_network", "lora_names", "refresh_loras"]

_PACKED_SUFFIXES = ("_q_proj", "_k_proj", "_v_proj")
# Parts of a layer's key (after its first dot) in the files the built-in loader reads: LoRA/LoCon,
# PEFT, LoHa, LoKr, IA3, OFT, full and norm differences.
_LORA_PART_PREFIXES = ("lora_up.", "lora_down.", "lora_mid.", "lora_A.", "lora_B.", "hada_", "lokr_", "oft_")
_LORA_PART_NAMES = frozenset({"on_input", "weight", "bias", "diff", "diff_b", "w_norm", "b_norm", "alpha",
                              "dora_scale"})


def _networks():
    import networks  # the built-in Lora extension's module, importable once it has loaded

    return networks


def _shared():
    from modules import shared

    return shared


def _networks():
    import networks  # the built-in Lora extension's module, importable once it has loaded

    return networks


def _shared():
    from modules import shared

    return shared


# -- LoRA files through the built-in loader ----------------------------------------------------


def _is_routable(module) -> bool:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 4):
        return False
    return not isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.Embedding))


def _layer_name(module, key: str) -> str:
    return getattr(module, "network_layer_name", None) or key


def convert_network(net, mapping: Mapping[str, nn.Module]) -> LoadedLora:
    """Adapters (multiplier 1) from a built-in ``network.Network``.

    LoRA/LoCon modules give their factors and ``calc_scale()``; other module types (and
    DoRA) give the delta of their own ``calc_updown`` with the multipliers set to 1.
    Text-encoder layers are the ones the built-in treats so (``'transformer'`` in the
    first 20 characters of the layer key). The q/k/v parts of a ``MultiheadAttention``
    and its ``out_proj`` are used as weights, not called as modules, so they go to
    ``te_merge`` (merged around the text-encoder pass only).
    """
    loaded = LoadedLora()
    saved = (net.te_multiplier, net.unet_multiplier, getattr(net, "dyn_dim", None))
    net.te_multiplier = net.unet_multiplier = 1.0
    net.dyn_dim = None
    try:
        for key, module in net.modules.items():
            target = module.sd_module
            is_te = "transformer" in str(getattr(module, "sd_key", key))[:20]
            loaded.kinds.add(type(module).__name__)
            kind, name, piece = _convert_module(key, module, target, mapping)
            if piece is None:
                loaded.unmatched += 1
                continue
            bucket = {"merge": loaded.te_merge, "route": loaded.te if is_te else loaded.unet}[kind]
            if kind == "merge" and not is_te:
                loaded.unmatched += 1  # packed attention only exists in the text encoders of SD models
                continue
            bucket.setdefault(name, []).append(piece)
    finally:
        net.te_multiplier, net.unet_multiplier, net.dyn_dim = saved
    for bucket in (loaded.unet, loaded.te, loaded.te_merge):
        for name, items in bucket.items():
            if len(items) == 1:
                bucket[name] = items[0]
    return loaded


def _factor(layer) -> torch.Tensor | None:
    return None if layer is None else layer.weight.detach()


def _convert_module(key: str, module, target, mapping):
    """``(kind, target name, piece)``; kind "route" (routed output) or "merge" (packed weight)."""
    if isinstance(target, nn.MultiheadAttention):
        suffix = next((s for s in _PACKED_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            return "merge", key, None
        index = _PACKED_SUFFIXES.index(suffix)
        size = target.embed_dim
        inner = _lowrank_or_dense(module, target.in_proj_weight, size)
        name = _layer_name(target, key[: -len(suffix)])
        return "merge", name, None if inner is None else OutputSlice(inner, index * size, size)
    if not _is_routable(target):
        return "route", key, None
    name = _layer_name(target, key)
    parent = mapping.get(name[: -len("_out_proj")]) if name.endswith("_out_proj") else None
    piece = _lowrank_or_dense(module, target.weight, None)
    if isinstance(parent, nn.MultiheadAttention):
        return "merge", name, piece
    return "route", name, piece


def _lowrank_or_dense(module, weight: torch.Tensor, rows: int | None):
    up, down = _factor(getattr(module, "up_model", None)), _factor(getattr(module, "down_model", None))
    if up is not None and down is not None and getattr(module, "dora_scale", None) is None:
        mid = _factor(getattr(module, "mid_model", None))
        if weight.dim() == 2:
            down, up = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)
        return LowRank(down, up, float(module.calc_scale()), mid)
    with torch.no_grad():
        delta, bias = module.calc_updown(weight)
    delta = delta.detach().to("cpu")
    delta = delta.reshape(rows, *weight.shape[1:]) if rows is not None else delta.reshape(weight.shape)
    return Dense(delta, 1.0, None if bias is None else bias.detach().to("cpu").reshape(-1))


class A1111Bridge(HostBridge):
    """The built-in Lora extension's file list and loader, and the model's layer names."""

    def __init__(self):
        shared = _shared()
        self.networks = _networks()
        self.model = shared.sd_model
        self.default_multiplier = float(getattr(shared.opts, "extra_networks_default_multiplier", 1.0) or 1.0)
        self._mapping = None

    def model_key(self):
        info = getattr(self.model, "sd_checkpoint_info", None)
        return (id(self.model), getattr(info, "filename", None), getattr(self.model, "sd_model_hash", None))

    def mapping(self) -> Mapping[str, nn.Module]:
        if self._mapping is None:
            mapping = getattr(self.model, "network_layer_mapping", None)
            if not mapping:
                self.networks.assign_network_names_to_compvis_modules(self.model)
                mapping = self.model.network_layer_mapping
            self._mapping = mapping
        return self._mapping

    def _on_disk(self, name: str):
        nets = self.networks

        def look():
            if name.lower() in getattr(nets, "forbidden_network_aliases", {}):
                return nets.available_networks.get(name)
            return nets.available_network_aliases.get(name)

        found = look()
        if found is None and hasattr(nets, "update_available_networks_by_names"):
            nets.update_available_networks_by_names([name])
            found = look()
        return found

    def find_lora(self, name: str) -> LoraFile | None:
        on_disk = self._on_disk(name)
        if on_disk is None or not getattr(on_disk, "filename", None):
            return None
        return LoraFile.at(name, on_disk.filename)

    def available_loras(self) -> list[str]:
        return sorted(self.networks.available_networks)

    def load_lora(self, lora_file: LoraFile) -> LoadedLora:
        on_disk = self._on_disk(lora_file.name)
        if on_disk is None:
            raise LoraLoadError("not found")
        layers = _file_layers(on_disk.filename)
        net = self.networks.load_network(lora_file.name, on_disk)
        if net is None:
            raise LoraLoadError("the Lora extension returned nothing")
        loaded = convert_network(net, self.mapping())
        if layers is not None:
            # the built-in loader drops the layers it cannot map before they reach convert_network
            loaded.layers = layers
            loaded.unmatched += max(0, layers - len(net.modules))
        return loaded

    def _targets(self, unet: bool) -> dict[str, nn.Module]:
        return {k: m for k, m in self.mapping().items() if k.startswith("diffusion_model_") == unet}

    def unet_targets(self):
        return self._targets(True)

    def te_targets(self):
        return self._targets(False)


def _file_layers(filename: str) -> int | None:
    """LoRA layers a safetensors file holds, as the built-in loader groups its keys (text before the first dot).

    Reads the header only. None for other file types. Raises :class:`LoraLoadError`
    for a file with tensors but no LoRA-type key (a checkpoint or VAE in the LoRA folder).
    """
    if not str(filename).lower().endswith(".safetensors"):
        return None
    try:
        from safetensors import safe_open

        with safe_open(filename, framework="pt") as f:
            keys = list(f.keys())
    except Exception:  # unreadable here: the built-in loader's own error says why
        return None
    keys = [k for k in keys if not k.startswith("bundle_emb.")]  # embeddings bundled with the LoRA
    layers = {k.partition(".")[0] for k in keys if _is_lora_part(k.partition(".")[2])}
    if keys and not layers:
        raise LoraLoadError(Reason.not_a_lora(len(keys)))
    return len(layers)


def _is_lora_part(part: str) -> bool:
    return part in _LORA_PART_NAMES or part.startswith(_LORA_PART_PREFIXES)


def lora_names() -> list[str]:
    try:
        return sorted(_networks().available_networks)
    except Exception:
        return []


def refresh_loras() -> None:
    _networks().list_available_networks()
