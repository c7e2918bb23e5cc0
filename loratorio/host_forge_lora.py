"""Forge adapter, LoRA files: Forge's own loader and key maps turned into LoRAtorio adapters.

LoRA weights come from Forge's loader and key maps
(``packages_3rdparty/comfyui_lora_collection/lora.py``): low-rank entries become
:class:`~loratorio.lora.LowRank`, entries for part of a packed weight (Flux's fused qkv,
``(key, (0, offset, size))``) become :class:`~loratorio.lora.OutputSlice`, every other type
(LoHa, LoKr, DoRA, GLoRA, full diffs) a :class:`~loratorio.lora.Dense` delta computed by
Forge's own ``merge_lora_to_weight``. Forge's ``Linear`` is a plain ``nn.Module``, not a
``torch.nn.Linear``: targets are found from the key maps and the parameter shapes, never by
class.

Forge modules are imported inside functions (:func:`_forge`): this file must import in
A1111 (where the script never calls it) and in tests (where a fake provides them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .host_forge_backend import (
    LORA_KEY_SUFFIXES,
    Backend,
    backups,
    detect,
    layer_of,
    low_rank_parts,
    needs_base_weight,
    patch_kind,
)
from .loading import HostBridge, LoadedLora, LoraFile, LoraLoadError, Reason
from .lora import Dense, LowRank, OutputSlice

__all__ = ["ForgeBridge", "adapters_from_patches", "is_forge", "loaded_from_state_dict"]

_WEIGHT = ".weight"
def is_forge(sd_model) -> bool:
    """Forge's engines carry ``forge_objects`` (UNet/CLIP/VAE patchers); A1111's models do not."""
    return sd_model is not None and hasattr(sd_model, "forge_objects")


# -- LoRA weights from Forge's loader ----------------------------------------------------------


def _split_key(key) -> tuple[str, tuple[int, int, int] | None, Callable | None]:
    """Forge patch key -> (parameter name, (dim, offset, size) or None, weight function or None)."""
    if isinstance(key, str):
        return key, None, None
    name, offset = key[0], key[1]
    return name, (tuple(int(v) for v in offset) if offset is not None else None), (key[2] if len(key) > 2 else None)


def _is_plain_float(param: torch.Tensor) -> bool:
    # bnb/gguf parameters hold packed low-bit data, not a dense weight
    # (Neo's mixed-precision QuantizedTensor can report a float dtype over fp8/fp4 storage)
    return (param.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
            and getattr(param, "quant_state", None) is None and getattr(param, "gguf_cls", None) is None
            and type(param).__name__ != "QuantizedTensor")


def logical_shape(param: torch.Tensor) -> torch.Size:
    """The weight's shape as the layer computes with it.

    GGUF parameters already report it (``operations_gguf.py:27-34``); bitsandbytes 4-bit
    parameters store packed bytes and keep the real shape in ``quant_state.shape``.
    """
    state = getattr(param, "quant_state", None)
    shape = getattr(state, "shape", None)
    return torch.Size(shape) if shape is not None else param.shape


def _store_dtype(param: torch.Tensor) -> torch.dtype:
    """Dtype to keep dense deltas in: the weight's own float dtype, fp16 for low-bit weights."""
    return param.dtype if param.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float16


def _low_rank(parts, shape: torch.Size, rows: int) -> LowRank | None:
    """``(up, down, alpha, mid)`` of a LoRA patch as factors for a weight of ``shape``; None if they do not fit.

    Scale ``alpha / rank`` (1 without alpha), as Forge merges (``backend/patcher/lora.py:150-177``).
    """
    up, down, alpha, mid = parts
    rank = down.shape[0]
    scale = float(alpha) / rank if alpha is not None else 1.0
    if len(shape) == 4:
        if down.dim() == 2:
            down = down.reshape(*down.shape, 1, 1)
        if up.dim() == 2:
            up = up.reshape(*up.shape, 1, 1)
        kernel = tuple(mid.shape[2:]) if mid is not None else tuple(down.shape[2:])
        if kernel != tuple(shape[2:]) or down.shape[1] != shape[1]:
            return None
    else:
        if mid is not None or (down.dim() == 4 and tuple(down.shape[2:]) != (1, 1)):
            return None
        down, up = down.flatten(1), up.flatten(1)
        if down.shape[1] != shape[1]:
            return None
    if up.shape[0] != rows:
        return None
    try:
        return LowRank(down, up, scale, mid)
    except ValueError:
        return None


def _dense(value, key, shape: torch.Size, offset, function, original: torch.Tensor, merge):
    """Forge's own merge of one patch at strength 1 as a float32 weight delta; ``(delta, None)`` or ``(None, why)``.

    Types whose delta does not depend on the weight (LoRA, LoHa, LoKr, diff) are merged
    into zeros; DoRA, GLoRA, OFT and BOFT need the unpatched weight and are merged into it.
    ``merge(value, base, key, offset, function)`` is the host's merge (:class:`Backend`).
    """
    kind = patch_kind(value)
    needs_weight = needs_base_weight(value)
    if needs_weight:
        if not _is_plain_float(original):
            return None, f"{kind} with weight decomposition needs the base weight, which is quantized here"
        base = original.detach().to(device="cpu", dtype=torch.float32)
    else:
        base = torch.zeros(shape, dtype=torch.float32)
    try:
        with torch.inference_mode():
            merged = merge(value, base.clone(), key, offset, function)
    except Exception as exc:  # Forge's merge raises on factors that do not fit the weight
        return None, f"{kind} factors do not fit the layer's weight {list(shape)} ({exc})"
    merged = merged.clone()  # an ordinary tensor, usable outside inference mode
    if merged.shape != shape:
        return None, f"{kind} changes the layer's shape {list(shape)} -> {list(merged.shape)}"
    return (merged - base if needs_weight else merged), None


def _parameter(root: torch.nn.Module, name: str):
    """The attribute at dotted ``name`` under ``root`` (AttributeError when a part is missing)."""
    obj = root
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def adapters_from_patches(patches: Mapping, root: torch.nn.Module, *, merge: Callable,
                          originals: Mapping | None = None) -> tuple[dict, set, list[tuple[str, str]]]:
    """The host loader's patches -> an adapter set keyed by module name (relative to ``root``).

    ``patches[key]``: a patch value (a ``(kind, tensors)`` tuple or a weight-adapter
    object, see :func:`~loratorio.host_forge_backend.patch_kind`) with ``key`` a parameter
    name or ``(name, (dim, offset, size))`` for part of a packed weight. ``merge`` is the
    host's merge of one patch (:attr:`Backend.merge`). Returns
    ``(adapter_set, kinds, skipped)``; ``skipped`` lists ``(key, reason)`` for entries
    that cannot be composed (a bias or norm patch, factors that do not fit, a ``set``
    patch, a weight-dependent type on a quantized weight). ``originals`` maps parameter
    names to their unpatched weights (the patcher's backup). Scales are at
    multiplier 1.
    """
    originals = originals or {}
    out: dict[str, list] = {}
    kinds: set = set()
    skipped: list[tuple[str, str]] = []
    for key, value in patches.items():
        name, offset, function = _split_key(key)
        kind = patch_kind(value)
        if not name.endswith(_WEIGHT):
            skipped.append((str(key), "only weight patches are composed (bias/norm patch left out)"))
            continue
        try:
            param = _parameter(root, name)
        except AttributeError:
            skipped.append((str(key), "no such layer in this model"))
            continue
        shape = logical_shape(param) if isinstance(param, torch.Tensor) else None
        if shape is None or len(shape) not in (2, 4):
            skipped.append((str(key), "not a linear or convolution weight"))
            continue
        if kind == "set":
            skipped.append((str(key), "a 'set' patch replaces the weight and cannot run as a branch"))
            continue
        slice_rows = offset is not None and offset[0] == 0
        rows = offset[2] if slice_rows else shape[0]
        piece = None
        parts = low_rank_parts(value)
        if parts is not None and function is None and (offset is None or slice_rows):
            piece = _low_rank(parts, shape, rows)
            if piece is not None and slice_rows:
                piece = OutputSlice(piece, offset[1], offset[2])
        if piece is None:
            delta, why = _dense(value, key, shape, offset, function, originals.get(name, param), merge)
            if delta is None:
                skipped.append((str(key), why))
                continue
            dtype = _store_dtype(param)
            if slice_rows:
                piece = OutputSlice(Dense(delta.narrow(0, offset[1], offset[2]).to(dtype)), offset[1], offset[2])
            else:
                piece = Dense(delta.to(dtype))
        kinds.add(kind)
        out.setdefault(name[: -len(_WEIGHT)], []).append(piece)
    return {k: v[0] if len(v) == 1 else v for k, v in out.items()}, kinds, skipped


def _layer_count(keys) -> int:
    """Distinct layers among left-over LoRA tensor names."""
    return len({layer_of(k) for k in keys})


def loaded_from_state_dict(state_dict: Mapping, unet_model: torch.nn.Module, text_encoders: torch.nn.Module | None,
                           backend: Backend | None = None, *, unet_patcher=None, clip_patcher=None) -> LoadedLora:
    """A LoRA file's tensors -> adapters for the UNet/DiT and the text encoders, through the host's loader.

    UNet/DiT keys are matched first, the rest against the text encoders, as the built-in
    LoRA does; a file the built-in would refuse as a mismatch is refused here too. The
    patchers give the unpatched weights of layers the built-in has merged into.
    """
    backend = backend or detect()
    if not any(k.endswith(LORA_KEY_SUFFIXES) for k in state_dict):
        raise LoraLoadError(Reason.not_a_lora(len(state_dict)))
    unet_patches, te_patches, rest = backend.lora_patches(state_dict, unet_model, text_encoders)
    if backend.mismatch_refused(len(rest), len(state_dict)):
        # An SDXL LoRA on SD1.5 still matches CLIP-L (lora_te1_) and a few same-sized UNet layers; the built-in
        # LoRA applies nothing of such a file, and a branch of its stray layers would be noise.
        raise LoraLoadError(f"{len(rest)} of its {len(state_dict)} tensors match no layer of this model "
                            "(a LoRA for another model type?); the WebUI's own LoRA loader refuses it too")
    unet, kinds, skipped_u = adapters_from_patches(unet_patches, unet_model, merge=backend.merge,
                                                   originals=backups(unet_patcher or unet_model))
    te, kinds_te, skipped_t = {}, set(), []
    if text_encoders is not None:
        te, kinds_te, skipped_t = adapters_from_patches(te_patches, text_encoders, merge=backend.merge,
                                                        originals=backups(clip_patcher or text_encoders))
    skipped = skipped_u + skipped_t
    if not unet and not te and skipped:
        # the file matches this model but none of its layers can run as a branch: say why
        key, reason = skipped[0]
        raise LoraLoadError(f"none of its {len(skipped)} matching layers can be composed ({key}: {reason})")
    return LoadedLora(unet=unet, te=te, unmatched=_layer_count(rest) + len(skipped), kinds=kinds | kinds_te,
                      layers=_layer_count(state_dict))


def _exception_text(exc: BaseException) -> str:
    """An exception's message on one line; where it has none, the one it was raised from or during.

    Forge Classic's loader re-raises a corrupt file's error as a bare ``ValueError`` (``from None``
    hides the cause from tracebacks, not from ``__context__``).
    """
    seen = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = " ".join(str(current).split())
        if text:
            return text
        current = current.__cause__ or current.__context__
    return type(exc).__name__


def _weight_targets(root: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Modules with a 2-D (linear) or 4-D (conv) ``weight`` parameter, by name; the class does not matter."""
    out = {}
    for name, module in root.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() in (2, 4) and not isinstance(module, torch.nn.Embedding):
            out[name] = module
    return out


class ForgeBridge(HostBridge):
    """What :class:`~loratorio.generation.GenerationState` needs from Forge."""

    def __init__(self, sd_model, networks_module=None):
        self.sd_model = sd_model
        self._networks = networks_module
        self._unet_targets = None
        self._te_targets = None

    @property
    def unet_model(self):
        return self.sd_model.forge_objects.unet.model

    @property
    def text_encoders(self):
        clip = getattr(self.sd_model.forge_objects, "clip", None)
        return getattr(clip, "cond_stage_model", None)

    def networks(self):
        if self._networks is None:
            import networks  # the built-in LoRA extension's module

            self._networks = networks
        return self._networks

    def model_key(self):
        info = getattr(self.sd_model, "sd_checkpoint_info", None)
        return (id(self.unet_model), id(self.text_encoders), getattr(info, "filename", None))

    def find_lora(self, name: str) -> LoraFile | None:
        nets = self.networks()
        entry = nets.available_network_aliases.get(name) or nets.available_networks.get(name)
        if entry is None:
            nets.list_available_networks()
            entry = nets.available_network_aliases.get(name) or nets.available_networks.get(name)
        return LoraFile.at(name, entry.filename) if entry is not None else None

    def available_loras(self) -> list[str]:
        return sorted(self.networks().available_networks)

    def load_lora(self, lora_file: LoraFile) -> LoadedLora:
        backend = detect()
        try:
            sd = backend.load_file(lora_file.path)
        except Exception as exc:
            # Forge's loader (modules_forge/patch_basic.py:35-54) renames an unreadable file to *.corrupted and
            # raises a message of several lines; the reason goes into one infotext value, so keep it on one line
            raise LoraLoadError(f"cannot read {lora_file.path}: {_exception_text(exc)}") from exc
        objects = self.sd_model.forge_objects
        return loaded_from_state_dict(sd, self.unet_model, self.text_encoders, backend, unet_patcher=objects.unet,
                                      clip_patcher=getattr(getattr(objects, "clip", None), "patcher", None))

    def unet_targets(self) -> Mapping[str, torch.nn.Module]:
        if self._unet_targets is None:
            self._unet_targets = _weight_targets(self.unet_model)
        return self._unet_targets

    def te_targets(self) -> Mapping[str, torch.nn.Module]:
        if self._te_targets is None:
            self._te_targets = _weight_targets(self.text_encoders) if self.text_encoders is not None else {}
        return self._te_targets
