"""Forge adapter: LoRAtorio on Stable Diffusion WebUI Forge (SD1.x, SDXL, Flux).

Forge never fires ``on_cfg_denoised``; its sampler hands every extension a *post-CFG
function* instead (``backend/sampling/sampling_function.py:314-317``). Per sampling pass
(``process_before_every_sampling``, hires fix included) this module clones the UNet
patcher, registers

- a conditioning modifier that records the CFG scale and prepares the step: where it
  can, it hands Forge ``model_options`` with a ``model_function_wrapper`` that adds the
  branch rows to Forge's own model call (one call per step: Forge's cond/uncond chunks,
  then per branch a copy of each chunk's rows with the branch's own text), routes them
  to their LoRAs inside that call only and gives Forge back its own rows,
- a post-CFG function that fuses the branch predictions with the base predictions
  (method steps 1-8) and returns the guided result. Where a host feature keeps the
  branches out of Forge's call (a ControlNet, another extension's model-function
  wrapper, an AND prompt, the max-rows setting, too little free memory: see
  ``_fold_refusal``), it runs them through Forge's ``calc_cond_uncond_batch`` with the
  compiled conds it receives, in calls of their own, as before,

and assigns the clone back, as Forge's built-in PAG does. The base rows are never
routed: per-row LoRA hooks (:mod:`loratorio.routing`) touch only the branch rows, and
exist only while a model call with branch rows runs.

Forge's predictions are always *denoised* (x0) estimates, for every model family
(``backend/modules/k_model.py:25-46``); fusion runs in that form with ``x``.

LoRA weights come from Forge's own loader and key maps
(``packages_3rdparty/comfyui_lora_collection/lora.py``): low-rank entries become
:class:`~loratorio.lora.LowRank`, entries for part of a packed weight (Flux's fused qkv,
``(key, (0, offset, size))``) become :class:`~loratorio.lora.OutputSlice`, every other type
(LoHa, LoKr, DoRA, GLoRA, full diffs) a :class:`~loratorio.lora.Dense` delta computed by
Forge's own ``merge_lora_to_weight``. Forge's ``Linear`` is a plain ``nn.Module``, not a
``torch.nn.Linear``: targets are found from the key maps and the parameter shapes, never by
class.

The built-in LoRA keeps off the composed tags: in ``after_extra_networks_activate`` it
is activated again with only the remaining tags (Forge merges lazily, when a patcher is
loaded, so nothing of the composed LoRAs was merged), "Lora hashes" keep every LoRA,
and the handled tags leave the extra-network data, which is part of the conditioning
cache key. "Merge into base" LoRAs stay with the built-in and apply to every branch.

Each branch's text conditioning comes from the WebUI's prompt machinery with the text
encoder (CLIP-L/G, T5) routed through that LoRA alone, per sampling pass; at every step
it is reconstructed for the denoiser's current model call (prompt editing follows).

Nothing here writes a weight: hooks are removed when a branch call ends (also on
errors), the UNet clone is Forge's throw-away per-pass copy (given back at the end of a
batch), and the text-encoder branches use the same hooks. An error in a hook stops the
generation through the WebUI's interrupt with the cause in the console, the comments and
the infotext; the next generation is unaffected.

Memory: branch rows go through Forge's own batching; a call holds at most the
max-rows setting's rows and no more than Forge's estimate says fits in free memory
(at least one branch's batch). The routed factors are announced to Forge's memory
manager (``add_extra_preserved_memory_during_sampling``) and the peak estimate used to
size the model's share of the GPU covers the branch calls; nothing Forge owns is freed.

File:line references are to Forge f2.0.1v1.10.1 (``dfdcbab6``). Forge modules are
imported inside functions: this file must import in A1111 (where the script never calls
it) and in tests (where a fake provides them).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from . import host_common as hc
from .host_common import (
    AdapterCache,
    GenerationState,
    HostBridge,
    LoadedLora,
    LoraFile,
    LoraLoadError,
    Reason,
    get_state,
    report_after_images,
)
from .lora import Dense, LowRank, OutputSlice, pieces
from .routing import Router, RoutingError

__all__ = [
    "CACHE",
    "ForgeBridge",
    "PassContext",
    "adapters_from_patches",
    "install_pass",
    "is_forge",
    "loaded_from_state_dict",
    "make_post_cfg",
    "pass_step",
]

_WEIGHT = ".weight"
# Forge's built-in LoRA refuses a file ("LoRA version mismatch") when more of its tensors than this match
# neither the UNet/DiT nor the text encoders (``extensions-builtin/sd_forge_lora/networks.py:25-27``).
_MISMATCH_TENSORS = 12
# Key endings of the tensors LoRA-like files hold (kohya, PEFT, diffusers, LyCORIS).
_LORA_SUFFIXES = (
    ".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", ".lora_A.weight", ".lora_B.weight",
    "_lora.up.weight", "_lora.down.weight", ".lora.up.weight", ".lora.down.weight",
    ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", ".alpha", ".dora_scale",
    ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
    ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2",
    ".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight", ".diff", ".diff_b", ".w_norm", ".b_norm",
    ".set_weight",
)


def _forge() -> SimpleNamespace:
    """Forge's backend modules this adapter calls (imported on use)."""
    import backend.memory_management as memory_management
    import backend.utils as utils
    from backend.patcher import lora as forge_lora
    from backend.sampling import condition, sampling_function

    return SimpleNamespace(memory=memory_management, utils=utils, lora=forge_lora, condition=condition,
                           sampling=sampling_function)


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
    return (param.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64)
            and getattr(param, "quant_state", None) is None and getattr(param, "gguf_cls", None) is None)


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


def _low_rank(tensors, shape: torch.Size, rows: int) -> LowRank | None:
    """``("lora", (up, down, alpha, mid, dora))`` as factors for a weight of ``shape``; None if they do not fit.

    Scale ``alpha / rank`` (1 without alpha), as Forge merges (``backend/patcher/lora.py:150-177``).
    """
    up, down, alpha, mid, _dora = tensors
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
    into zeros; DoRA and GLoRA need the unpatched weight and are merged into it.
    """
    kind = value[0] if len(value) == 2 else "diff"
    tensors = value[1] if len(value) == 2 else value
    needs_weight = kind == "glora" or (kind in ("lora", "loha", "lokr") and tensors[-1] is not None)
    if needs_weight:
        if not _is_plain_float(original):
            return None, f"{kind} with weight decomposition needs the base weight, which is quantized here"
        base = original.detach().to(device="cpu", dtype=torch.float32)
    else:
        base = torch.zeros(shape, dtype=torch.float32)
    try:
        with torch.inference_mode():
            merged = merge([[1.0, value, 1.0, offset, function]], base.clone(), str(key),
                           computation_dtype=torch.float32)
    except Exception as exc:  # Forge's merge raises on factors that do not fit the weight
        return None, f"{kind} factors do not fit the layer's weight {list(shape)} ({exc})"
    merged = merged.clone()  # an ordinary tensor, usable outside inference mode
    if merged.shape != shape:
        return None, f"{kind} changes the layer's shape {list(shape)} -> {list(merged.shape)}"
    return (merged - base if needs_weight else merged), None


def adapters_from_patches(patches: Mapping, root: torch.nn.Module, *, merge: Callable,
                          get_attr_with_parent: Callable, originals: Mapping | None = None
                          ) -> tuple[dict, set, list[tuple[str, str]]]:
    """Forge ``load_lora`` patches -> an adapter set keyed by module name (relative to ``root``).

    ``patches[key]``: ``(kind, tensors)`` with ``key`` a parameter name or
    ``(name, (dim, offset, size))`` for part of a packed weight. Returns
    ``(adapter_set, kinds, skipped)``; ``skipped`` lists ``(key, reason)`` for entries
    that cannot be composed (a bias or norm patch, factors that do not fit, a ``set``
    patch, a weight-dependent type on a quantized weight). ``originals`` maps parameter
    names to their unpatched weights (Forge's ``LoraLoader.backup``). Scales are at
    multiplier 1.
    """
    originals = originals or {}
    out: dict[str, list] = {}
    kinds: set = set()
    skipped: list[tuple[str, str]] = []
    for key, value in patches.items():
        name, offset, function = _split_key(key)
        kind = value[0] if len(value) == 2 else "diff"
        if not name.endswith(_WEIGHT):
            skipped.append((str(key), "only weight patches are composed (bias/norm patch left out)"))
            continue
        try:
            _parent, _attr, param = get_attr_with_parent(root, name)
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
        if kind == "lora" and value[1][4] is None and function is None and (offset is None or slice_rows):
            piece = _low_rank(value[1], shape, rows)
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
    layers = set()
    for k in keys:
        for suffix in _LORA_SUFFIXES:
            if k.endswith(suffix):
                layers.add(k[: -len(suffix)])
                break
        else:
            layers.add(k)
    return len(layers)


def loaded_from_state_dict(state_dict: Mapping, unet_model: torch.nn.Module, text_encoders: torch.nn.Module | None,
                           forge=None) -> LoadedLora:
    """A LoRA file's tensors -> adapters for the UNet/DiT and the text encoders, through Forge's loader.

    Key maps are built fresh (Forge's helpers have a mutable default argument that
    accumulates keys across models). UNet/DiT keys are matched first, the rest against
    the text encoders, as the built-in LoRA does.
    """
    forge = forge or _forge()
    if not any(k.endswith(_LORA_SUFFIXES) for k in state_dict):
        raise LoraLoadError(Reason.not_a_lora(len(state_dict)))
    unet_map = forge.lora.model_lora_keys_unet(unet_model, {})
    unet_patches, rest = forge.lora.load_lora(dict(state_dict), unet_map)
    te_patches: dict = {}
    if text_encoders is not None:
        te_map = forge.lora.model_lora_keys_clip(text_encoders, {})
        te_patches, rest = forge.lora.load_lora(rest, te_map)
    if len(rest) > _MISMATCH_TENSORS:
        # An SDXL LoRA on SD1.5 still matches CLIP-L (lora_te1_) and a few same-sized UNet layers; Forge's
        # built-in LoRA applies nothing of such a file, and a branch of its stray layers would be noise.
        raise LoraLoadError(f"{len(rest)} of its {len(state_dict)} tensors match no layer of this model "
                            "(a LoRA for another model type?); Forge's own LoRA loader refuses it too")
    merge = forge.lora.merge_lora_to_weight
    get = forge.utils.get_attr_with_parent
    unet, kinds, skipped_u = adapters_from_patches(unet_patches, unet_model, merge=merge, get_attr_with_parent=get,
                                                   originals=_backup_of(unet_model))
    te, kinds_te, skipped_t = {}, set(), []
    if text_encoders is not None:
        te, kinds_te, skipped_t = adapters_from_patches(te_patches, text_encoders, merge=merge,
                                                        get_attr_with_parent=get, originals=_backup_of(text_encoders))
    skipped = skipped_u + skipped_t
    if not unet and not te and skipped:
        # the file matches this model but none of its layers can run as a branch: say why
        key, reason = skipped[0]
        raise LoraLoadError(f"none of its {len(skipped)} matching layers can be composed ({key}: {reason})")
    return LoadedLora(unet=unet, te=te, unmatched=_layer_count(rest) + len(skipped), kinds=kinds | kinds_te,
                      layers=_layer_count(state_dict))


def _backup_of(model) -> dict:
    """Unpatched weights Forge keeps while the built-in LoRA has merged into a layer."""
    loader = getattr(model, "lora_loader", None)
    return dict(getattr(loader, "backup", {}) or {})


def _weight_targets(root: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Modules with a 2-D (linear) or 4-D (conv) ``weight`` parameter, by name; the class does not matter."""
    out = {}
    for name, module in root.named_modules():
        w = getattr(module, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() in (2, 4) and not isinstance(module, torch.nn.Embedding):
            out[name] = module
    return out


class ForgeBridge(HostBridge):
    """What :class:`~loratorio.host_common.GenerationState` needs from Forge."""

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
        forge = _forge()
        try:
            sd = forge.utils.load_torch_file(lora_file.path, safe_load=True)
        except Exception as exc:
            # Forge's loader (modules_forge/patch_basic.py:35-54) renames an unreadable file to *.corrupted and
            # raises a message of several lines; the reason goes into one infotext value, so keep it on one line
            raise LoraLoadError(f"cannot read {lora_file.path}: {' '.join(str(exc).split())}") from exc
        return loaded_from_state_dict(sd, self.unet_model, self.text_encoders, forge)

    def unet_targets(self) -> Mapping[str, torch.nn.Module]:
        if self._unet_targets is None:
            self._unet_targets = _weight_targets(self.unet_model)
        return self._unet_targets

    def te_targets(self) -> Mapping[str, torch.nn.Module]:
        if self._te_targets is None:
            self._te_targets = _weight_targets(self.text_encoders) if self.text_encoders is not None else {}
        return self._te_targets


# -- the per-step hook ------------------------------------------------------------------------


def pass_step(denoiser) -> int:
    """0-based sampling step of the current pass from Forge's CFG denoiser.

    ``denoiser.step`` counts model calls; second-order samplers make two per step and
    declare ``total_steps = 2 * steps`` (``modules/sd_samplers_common.py:17-21``), so
    both calls of a step get the same index. (``state.sampling_step`` lags a step
    behind: the sampler's callback sets it after each step.)
    """
    calls = int(getattr(denoiser, "step", 0) or 0)
    steps = int(getattr(denoiser, "steps", 0) or 0)
    total = int(getattr(denoiser, "total_steps", 0) or 0)
    if steps <= 0 or total <= 0:
        return calls
    return min(steps - 1, calls * steps // total)


def _cfg(opts: Mapping, x, sigma, model, cond_scale: float, edit_strength: float, cond, uncond):
    """Forge's CFG step (``sampling_function.py:305-312``) on x0 predictions ``cond``/``uncond``."""
    fn = opts.get("sampler_cfg_function")
    if fn is not None:
        args = {"cond": x - cond, "uncond": x - uncond, "cond_scale": cond_scale, "timestep": sigma, "input": x,
                "sigma": sigma, "cond_denoised": cond, "uncond_denoised": uncond, "model": model,
                "model_options": opts}
        return x - fn(args)
    if not math.isclose(edit_strength, 1.0):
        return uncond + (cond - uncond) * cond_scale * edit_strength
    return uncond + (cond - uncond) * cond_scale


@dataclass
class PassContext:
    """What the post-CFG function of one sampling pass needs (kept on the generation state).

    ``texts[j]``: branch ``j``'s ``(cond, uncond)`` prompt conditioning from its own text
    encoder (WebUI schedule objects; ``uncond`` may be None), or None for the base text.
    """

    state: GenerationState
    p: object
    texts: list = field(default_factory=list)
    max_rows: int = 0
    cond_scale: float | None = None
    closed: bool = False
    source_unet: object = None  # the patcher this pass cloned
    unet: object = None  # the clone carrying the LoRAtorio step
    calls: list = field(default_factory=list)  # (rows, branches) of every routed model call
    step_texts: dict = field(default_factory=dict)
    fold: _Fold | None = None  # the current model call's branch rows inside Forge's own batch
    post_cfg: Callable | None = None  # this pass's post-CFG function (to know whether it runs first)


_COND, _UNCOND = 0, 1  # Forge's cond_or_uncond marks


@dataclass
class _Fold:
    """Branch rows that ride in Forge's own model call of one denoiser evaluation.

    Prepared by the conditioning modifier (which runs before Forge batches cond and
    uncond), filled by the model-function wrapper when the call runs (``outputs[(j,
    kind)]``: branch ``j``'s x0 rows for that chunk kind), read by the post-CFG function.
    ``done`` holds the kinds already evaluated: a later call in the same step (another
    extension's post-CFG pass) runs plain.
    """

    step: int
    active: list[int]
    batch: int
    use_uncond: bool
    texts: dict
    outputs: dict = field(default_factory=dict)
    done: set = field(default_factory=set)
    closed: bool = False
    error: BaseException | None = None


def _spans(rows: int, group: Sequence[int], batch: int) -> list[list[slice]]:
    """Row slices of each member of ``group`` in a model call of ``rows`` rows.

    The branch input is ``len(group)`` blocks of ``batch`` rows (branch-major). Forge
    concatenates whole copies of it, one per chunk (``cond_or_uncond`` entry), and a
    wrapper may batch it further; the layout therefore repeats every
    ``len(group) * batch`` rows, whatever the order of the chunks.
    """
    block = len(group) * batch
    if rows <= 0 or rows % block:
        raise RoutingError(f"a model call of {rows} rows does not hold whole copies of the {block} branch rows; "
                           "another extension changed the batch inside the model call")
    return [[slice(c * block + k * batch, c * block + (k + 1) * batch) for c in range(rows // block)]
            for k in range(len(group))]


def _routed_options(ctx: PassContext, opts: Mapping, group: Sequence[int], batch: int) -> dict:
    """A copy of ``model_options`` whose model-function wrapper routes ``group``'s LoRAs around the model call.

    A wrapper already there (tiled diffusion, ...) is kept and handed a routed
    ``apply_model``, so it runs as usual with the branches' LoRAs switched on only
    inside the actual model call.
    """
    previous = opts.get("model_function_wrapper")
    n = len(ctx.state.branches)

    def routed(apply_model):
        def call(x, t, **c):
            # a branch owns one row block per chunk of the call (AND parts, a wrapper batching tiles)
            spans = _spans(x.shape[0], group, batch)
            rows: list = [None] * n
            for k, j in enumerate(group):
                rows[j] = spans[k]
            ctx.calls.append((int(x.shape[0]), len(group)))
            with ctx.state.router.route(rows):
                return apply_model(x, t, **c)

        return call

    def wrapper(apply_model, params):
        if previous is not None:
            return previous(routed(apply_model), params)
        return routed(apply_model)(params["input"], params["timestep"], **params["c"])

    out = dict(opts)
    out["model_function_wrapper"] = wrapper
    return out


_TEXT_CONDS = ("c_crossattn", "y")  # what a branch's own text encoder changes: tokens and pooled vector


def _branch_conds(base: list, owns: list) -> list:
    """Compiled conds of a branch call: ``base`` (one dict per AND part, B rows each) with each branch's text.

    ``owns[k]`` is the k-th branch's own compiled list (same parts) or None for the base
    text. Everything else (image conds, Flux guidance, ControlNet, AND strength) stays as
    Forge built it; Forge repeats those conditions to the rows of the call, which tiles
    them once per branch.
    """
    if all(o is None for o in owns):
        return base
    out = []
    for m, entry in enumerate(base):
        model_conds = dict(entry["model_conds"])
        for key in _TEXT_CONDS:
            cond = model_conds.get(key)
            base_tensor = getattr(cond, "cond", None)
            if not isinstance(base_tensor, torch.Tensor):
                continue
            rows = []
            for own in owns:
                mine = own[m]["model_conds"].get(key) if own is not None else None
                mine = getattr(mine, "cond", None)
                rows.append(base_tensor if mine is None else mine.to(base_tensor))
            model_conds[key] = type(cond)(torch.cat(rows))
        new = dict(entry)
        new["model_conds"] = model_conds
        out.append(new)
    return out


def _group_size(ctx: PassContext, model, x: torch.Tensor, parts: int, n_active: int) -> int:
    """Branches per model call: within the max-rows setting and what Forge's estimate says fits in free memory."""
    batch = int(x.shape[0])
    g = n_active
    if ctx.max_rows > 0:
        g = max(1, min(g, ctx.max_rows // max(1, batch * parts)))
    estimate = getattr(model, "memory_required", None)
    if estimate is not None and g > 1:
        free = _forge().memory.get_free_memory(x.device)
        while g > 1 and estimate([g * batch, *x.shape[1:]]) >= free:
            g -= 1
    return g


def _run_branches(ctx: PassContext, active: list[int], args: Mapping, conds: list, kind: str) -> torch.Tensor:
    """x0 predictions of the ``active`` branches for the compiled ``conds``: ``[len(active), B, C, H, W]``."""
    forge = _forge()
    x, sigma, model, opts = args["input"], args["sigma"], args["model"], args["model_options"]
    batch = int(x.shape[0])
    g = _group_size(ctx, model, x, len(conds), len(active))
    outs = []
    for start in range(0, len(active), g):
        group = active[start:start + g]
        x_t = x.repeat(len(group), *([1] * (x.dim() - 1)))
        sigma_t = sigma.repeat(len(group))
        own = [ctx.step_texts.get(j, (None, None))[0 if kind == "cond" else 1] for j in group]
        conds_t = _branch_conds(conds, own)
        out, _ = forge.sampling.calc_cond_uncond_batch(model, conds_t, None, x_t, sigma_t,
                                                       _routed_options(ctx, opts, group, batch))
        outs.append(out.reshape(len(group), batch, *x.shape[1:]))
    return torch.cat(outs)


def _compile_step_texts(ctx: PassContext, base_cond: list, base_uncond: list | None, active: list[int]) -> dict:
    """The active branches' own text conds at the denoiser's current model call (prompt editing follows)."""
    if not ctx.texts:
        return {}
    from modules import prompt_parser

    forge = _forge()
    denoiser = getattr(getattr(ctx.p, "sampler", None), "model_wrap_cfg", None)
    call = int(getattr(denoiser, "step", 0) or 0)
    out = {}
    for j in active:
        texts = ctx.texts[j] if j < len(ctx.texts) else None
        if texts is None:
            continue
        c, uc = texts
        composition, tensor = prompt_parser.reconstruct_multicond_batch(c, call)
        cond = forge.condition.compile_weighted_conditions(tensor, composition)
        uncond = None
        if uc is not None and base_uncond is not None:
            uncond = forge.condition.compile_conditions(prompt_parser.reconstruct_cond_batch(uc, call))
            if len(uncond) != len(base_uncond):
                uncond = None
        if len(cond) != len(base_cond):
            continue  # another extension reshaped the conds: the base text is the safe choice
        out[j] = (cond, uncond)
    return out


def _post_cfg(ctx: PassContext, args: Mapping) -> torch.Tensor:
    """One denoising step: branch predictions, fusion (method steps 1-8), Forge's CFG on the fused pair."""
    state = ctx.state
    composer = state.composer
    x, sigma, model, opts = args["input"], args["sigma"], args["model"], args["model_options"]
    cond, uncond = args["cond"], args["uncond"]
    cond_pred, uncond_pred = args["cond_denoised"], args["uncond_denoised"]
    cond_scale = ctx.cond_scale if ctx.cond_scale is not None else float(getattr(ctx.p, "cfg_scale", 1.0))
    # At CFG 1 Forge runs no uncond pass and uncond_pred is zeros (sampling_function.py:295-298).
    uncond_ran = uncond is not None and not (math.isclose(cond_scale, 1.0)
                                             and not opts.get("disable_cfg1_optimization", False))
    fold, ctx.fold = ctx.fold, None
    if fold is not None:
        fold.closed = True  # later calls of this step (the branch calls below, if any) run plain
        if fold.error is not None:
            raise fold.error
        step, active = fold.step, fold.active
    else:
        step = pass_step(getattr(getattr(ctx.p, "sampler", None), "model_wrap_cfg", None))
        active = composer.active(step)
    if not active:
        return args["denoised"]
    use_uncond = uncond_ran and composer.needs_uncond
    if composer.needs_uncond and not uncond_ran:
        state.extra["steps_without_uncond"] = state.extra.get("steps_without_uncond", 0) + 1
    state.extra["steps"] = state.extra.get("steps", 0) + 1
    folded = fold.outputs if fold is not None else {}
    need = [("cond", _COND, cond)] + ([("uncond", _UNCOND, uncond)] if use_uncond else [])
    preds = {}
    for name, kind, conds in need:
        if all((j, kind) in folded for j in active):
            preds[name] = torch.stack([folded[(j, kind)] for j in active])
            continue
        # this kind did not ride in Forge's call (see _fold_refusal): the branches' own call
        if not ctx.step_texts:
            ctx.step_texts = (fold.texts if fold is not None else
                              _compile_step_texts(ctx, cond, uncond if use_uncond else None, active))
        try:
            preds[name] = _run_branches(ctx, active, args, conds, name)
        finally:
            ctx.step_texts = {}
    lora_cond, lora_uncond = preds["cond"], preds.get("uncond")
    res = composer.fuse(step=step, active=active, base_cond=cond_pred, lora_cond=lora_cond,
                        base_uncond=uncond_pred if uncond_ran else None, lora_uncond=lora_uncond, x=x)
    fused_uncond = res.uncond if uncond_ran else uncond_pred
    edit_strength = sum(item.get("strength", 1) for item in cond)
    base = _cfg(opts, x, sigma, model, cond_scale, edit_strength, cond_pred, uncond_pred)
    fused = _cfg(opts, x, sigma, model, cond_scale, edit_strength, res.cond, fused_uncond)
    if _runs_first(ctx, opts):
        return fused  # nothing ran before: Forge's CFG result is ``base`` itself
    return args["denoised"] + (fused - base)  # keep what earlier post-CFG functions added


def _runs_first(ctx: PassContext, opts: Mapping) -> bool:
    """Whether this pass's post-CFG function is the first Forge runs (no earlier one changed the CFG result)."""
    functions = opts.get("sampler_post_cfg_function") or []
    return bool(functions) and ctx.post_cfg is not None and functions[0] is ctx.post_cfg


def make_post_cfg(ctx: PassContext) -> Callable[[dict], torch.Tensor]:
    """The post-CFG function of one pass: ``fn(args) -> denoised`` (``sampling_function.py:314-317``).

    ``args`` (all in the denoised form): ``denoised`` (the CFG result so far), ``cond`` /
    ``uncond`` (compiled condition lists), ``cond_denoised`` / ``uncond_denoised`` (base
    predictions), ``input`` (x), ``sigma``, ``model`` (KModel), ``model_options``.
    A closure, not a bound method: Forge deep-copies ``model_options`` on every clone
    and copies functions by reference. An error stops the generation through the
    WebUI's interrupt after this step, which keeps the base result.
    """

    def post_cfg(args):
        if ctx.closed or not hc.usable(ctx.state) or ctx.state.composer is None:
            return args["denoised"]
        try:
            return _post_cfg(ctx, args)
        except Exception as exc:
            ctx.closed = True
            _fail(ctx.p, ctx.state, exc, "composing a step")
            return args["denoised"]

    return post_cfg


def make_scale_recorder(ctx: PassContext) -> Callable:
    """A conditioning modifier (``sampling_function.py:359-360``): records the CFG scale and prepares the step.

    It runs before Forge batches cond and uncond: where the branch rows can join Forge's
    own model call (:func:`_fold_refusal`), the ``model_options`` it returns carry a
    model-function wrapper that adds them to that call. Conds, x and scale are unchanged.
    """

    def record(model, x, timestep, uncond, cond, cond_scale, model_options, seed):
        ctx.cond_scale = float(cond_scale)
        ctx.fold = None
        if ctx.closed or not hc.usable(ctx.state) or ctx.state.composer is None:
            return model, x, timestep, uncond, cond, cond_scale, model_options, seed
        try:
            model_options = _prepare_fold(ctx, model, x, uncond, cond, float(cond_scale), model_options)
        except Exception as exc:
            ctx.closed = True
            _fail(ctx.p, ctx.state, exc, "preparing a step")
        return model, x, timestep, uncond, cond, cond_scale, model_options, seed

    return record


def _uncond_runs(opts: Mapping, uncond, cond_scale: float) -> bool:
    """Whether Forge evaluates the uncond rows (no CFG-1 optimisation, ``sampling_function.py:295-298``)."""
    return uncond is not None and not (math.isclose(cond_scale, 1.0)
                                       and not opts.get("disable_cfg1_optimization", False))


def _fold_refusal(ctx: PassContext, model, x: torch.Tensor, uncond, cond, opts: Mapping, rows: int) -> str | None:
    """Why the branch rows cannot join Forge's own model call at this step (None: they can).

    - another extension's ``model_function_wrapper`` (tiled diffusion, ...) may split or
      rearrange the call's rows, so the branch rows keep a call of their own through it;
    - a ControlNet computes its control from the call's rows before the model call
      (``sampling_function.py:261-268``), for the base rows only;
    - AND prompts: Forge's batch of several sub-prompt chunks does not say which chunk is
      which sub-prompt, so a branch's own text could not be matched to it; area or mask
      conds cover part of the latent;
    - the max-rows setting, or Forge's free-memory estimate, does not allow the larger call.
    """
    if "model_function_wrapper" in opts:
        return "another model-function wrapper"
    parts = list(cond) + list(uncond or [])
    if any(part.get("control") is not None for part in parts):
        return "ControlNet"
    if len(cond) != 1 or (uncond is not None and len(uncond) != 1):
        return "AND prompt"
    if any("area" in part or "mask" in part for part in parts):
        return "area conditioning"
    if ctx.max_rows > 0 and rows > ctx.max_rows:
        return "more rows than max_rows_per_call"
    estimate = getattr(model, "memory_required", None)
    if estimate is not None and estimate([rows, *x.shape[1:]]) >= _forge().memory.get_free_memory(x.device):
        return "not enough free memory"
    return None


def _prepare_fold(ctx: PassContext, model, x, uncond, cond, cond_scale: float, opts: Mapping):
    """Set up :attr:`PassContext.fold` and return ``model_options`` with the wrapper that fills it (or unchanged)."""
    state = ctx.state
    composer = state.composer
    step = pass_step(getattr(getattr(ctx.p, "sampler", None), "model_wrap_cfg", None))
    active = composer.active(step)
    if not active or state.router is None:
        return opts
    uncond_ran = _uncond_runs(opts, uncond, cond_scale)
    use_uncond = uncond_ran and composer.needs_uncond
    batch = int(x.shape[0])
    kinds = 2 if uncond_ran else 1
    rows = batch * kinds * (1 + len(active)) if use_uncond else batch * (kinds + len(active))
    if _fold_refusal(ctx, model, x, uncond, cond, opts, rows):
        return opts
    texts = _compile_step_texts(ctx, cond, uncond if use_uncond else None, active)
    ctx.fold = _Fold(step, active, batch, use_uncond, texts)
    out = dict(opts)
    out["model_function_wrapper"] = _fold_wrapper(ctx)
    return out


def _own_text(fold: _Fold, j: int, kind: int, key: str, like: torch.Tensor) -> torch.Tensor | None:
    """Branch ``j``'s own ``key`` text rows for a chunk of ``kind`` laid out as ``like`` (None: the base rows)."""
    own = fold.texts.get(j)
    conds = None if own is None else own[kind]
    if not conds:
        return None
    tensor = getattr(conds[0]["model_conds"].get(key), "cond", None)
    if not isinstance(tensor, torch.Tensor):
        return None
    tensor = tensor.to(like)
    if tensor.shape[0] != like.shape[0]:
        tensor = tensor.repeat(-(-like.shape[0] // tensor.shape[0]), *([1] * (tensor.dim() - 1)))[:like.shape[0]]
    if tensor.dim() == 3 and tensor.shape[1] != like.shape[1]:
        if like.shape[1] % tensor.shape[1]:
            raise RoutingError(f"branch text of {tensor.shape[1]} tokens does not tile the call's {like.shape[1]}")
        tensor = tensor.repeat(1, like.shape[1] // tensor.shape[1], 1)  # Forge pads cond/uncond to a common length
    return tensor


def _fold_wrapper(ctx: PassContext) -> Callable:
    """The model-function wrapper that adds the branch rows to Forge's call and keeps their outputs.

    The call's rows become ``[Forge's chunks | branch blocks]``: per active branch (in
    order) one block of ``B`` rows per chunk of a kind it needs, each a copy of that
    chunk's rows with the branch's own text. ``transformer_options`` describe the longer
    batch (``cond_or_uncond``, indices, marks), so patches that act per chunk treat a
    branch block as a chunk of its kind. The branch rows are routed to their LoRAs only
    inside the call; Forge gets back its own rows.
    """

    def wrapper(apply_model, params):
        fold = ctx.fold
        x, t, c, marks = params["input"], params["timestep"], params["c"], list(params["cond_or_uncond"])
        if fold is None or fold.closed or ctx.closed:
            return apply_model(x, t, **c)
        batch = fold.batch
        n = int(x.shape[0])
        if n != len(marks) * batch:
            return apply_model(x, t, **c)  # not a layout this step prepared: its branches run apart
        blocks = []
        for j in fold.active:
            for o, kind in enumerate(marks):
                if kind in fold.done or (kind == _UNCOND and not fold.use_uncond):
                    continue
                blocks.append((j, kind, o))
        if not blocks:
            return apply_model(x, t, **c)
        fold.done.update(kind for _, kind, _ in blocks)
        picks = [slice(o * batch, (o + 1) * batch) for _, _, o in blocks]
        x_ext = torch.cat([x, *(x[r] for r in picks)])
        t_ext = torch.cat([t, *(t[r] for r in picks)])
        c_ext = {}
        for key, value in c.items():
            if key == "transformer_options":
                c_ext[key] = _extended_options(value, marks + [kind for _, kind, _ in blocks])
            elif isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
                parts = [value]
                for (j, kind, _o), r in zip(blocks, picks, strict=True):
                    own = _own_text(fold, j, kind, key, value[r]) if key in _TEXT_CONDS else None
                    parts.append(value[r] if own is None else own)
                c_ext[key] = torch.cat(parts)
            else:
                c_ext[key] = value
        n_adapters = len(ctx.state.branches)
        rows: list = [None] * n_adapters
        for i, (j, _kind, _o) in enumerate(blocks):
            start = n + i * batch
            rows[j] = slice(rows[j].start if rows[j] is not None else start, start + batch)
        ctx.calls.append((int(x_ext.shape[0]), len(fold.active)))
        errors: list = []  # an error of the routing itself: reported by the post-CFG function, Forge's rows stay exact
        try:
            with ctx.state.router.route(rows, errors=errors):
                out = apply_model(x_ext, t_ext, **c_ext)
        except Exception as exc:  # Forge's own call failed with our rows in it: say so, then it is Forge's error
            ctx.closed = True
            _fail(ctx.p, ctx.state, exc, "the model call with the branch rows")
            raise
        if errors:
            fold.error = errors[0]
        else:
            for i, (j, kind, _o) in enumerate(blocks):
                fold.outputs[(j, kind)] = out[n + i * batch:n + (i + 1) * batch]
        return out[:n]

    return wrapper


def _extended_options(options, marks: list[int]):
    """``transformer_options`` of the longer batch: the chunk marks and what Forge derives from them."""
    if not isinstance(options, Mapping):
        return options
    out = dict(options)
    out["cond_or_uncond"] = list(marks)
    sigmas = out.get("sigmas")
    if isinstance(sigmas, torch.Tensor):
        sampling = _forge().sampling
        per = int(sigmas.shape[0])
        if "cond_mark" in out:
            mark = getattr(sampling, "compute_cond_mark", None)
            out["cond_mark"] = (mark(marks, sigmas) if mark is not None else
                                torch.tensor([m for m in marks for _ in range(per)]).to(sigmas))
        if "cond_indices" in out or "uncond_indices" in out:
            indices = getattr(sampling, "compute_cond_indices", None)
            if indices is not None:
                out["cond_indices"], out["uncond_indices"] = indices(marks, sigmas)
            else:
                out["cond_indices"] = [i * per + r for i, m in enumerate(marks) if m == _COND for r in range(per)]
                out["uncond_indices"] = [i * per + r for i, m in enumerate(marks) if m == _UNCOND for r in range(per)]
    return out


# -- per-branch text encoder --------------------------------------------------------------------


@contextlib.contextmanager
def _kept_text_engine_params():
    """Forge's text engine leaves infotext entries in a module global; the branch passes must not add any."""
    try:
        from backend.text_processing import classic_engine
    except ImportError:
        yield
        return
    saved = dict(classic_engine.last_extra_generation_params)
    try:
        yield
    finally:
        classic_engine.last_extra_generation_params = saved


def _finite(obj) -> bool:
    """Every float tensor inside WebUI conditioning objects (schedules, multicond, dicts) is finite."""
    if isinstance(obj, torch.Tensor):
        return not obj.is_floating_point() or bool(torch.isfinite(obj).all())
    if isinstance(obj, Mapping):
        return all(_finite(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return all(_finite(v) for v in obj)
    return True


def branch_texts(p, state: GenerationState, has_uncond: bool) -> list:
    """Each branch's prompt conditioning computed with its own text-encoder LoRA, for this pass.

    Calls the WebUI's prompt machinery with the arguments ``processing.setup_conds`` /
    ``calculate_hr_conds`` use, so prompt editing, AND, BREAK, emphasis, SDXL's two
    encoders and Flux's CLIP-L + T5 (with its distilled guidance) follow; the text
    encoder's layers are routed through the one LoRA (forward hooks, no weight is
    written; Forge's text encoders have no packed projections). ``[(cond, uncond) |
    None]`` per branch; a non-finite result falls back to the base text with a note.
    """
    if not state.settings.text_encoder_per_branch or not any(b.te for b in state.branches):
        return []
    from modules import devices, prompt_parser, sd_samplers, shared

    router = state.extra.get("te_router")
    if router is None:
        router = Router(state.extra["bridge"].te_targets(), [b.te for b in state.branches])
        state.extra["te_router"] = router
    use_old = bool(getattr(shared.opts, "use_old_scheduling", False))
    if getattr(p, "is_hr_pass", False):
        width, height = p.hr_upscale_to_x, p.hr_upscale_to_y
        texts, negatives = p.hr_prompts, p.hr_negative_prompts
        distilled = getattr(p, "hr_distilled_cfg", None)
        config = sd_samplers.find_sampler_config(getattr(p, "hr_sampler_name", None) or p.sampler_name)
        hr = getattr(p, "hr_second_pass_steps", 0) or p.steps
        steps, hires_steps = p.firstpass_steps, (config.total_steps(hr) if config else hr)
    else:
        width, height = p.width, p.height
        texts, negatives = p.prompts, p.negative_prompts
        distilled = getattr(p, "distilled_cfg_scale", None)
        config = sd_samplers.find_sampler_config(p.sampler_name)
        steps, hires_steps = (config.total_steps(p.steps) if config else p.steps), None
    prompts = prompt_parser.SdConditioning(list(texts), width=width, height=height, distilled_cfg_scale=distilled)
    negative = prompt_parser.SdConditioning(list(negatives), width=width, height=height, is_negative_prompt=True,
                                            distilled_cfg_scale=distilled)
    need_uncond = has_uncond and state.settings.recenter > 0
    out = []
    n = len(state.branches)
    for j, branch in enumerate(state.branches):
        if not branch.te:
            out.append(None)
            continue
        rows: list = [None] * n
        rows[j] = slice(0, None)
        with _kept_text_engine_params(), torch.no_grad(), devices.autocast(), router.route(rows):
            c = prompt_parser.get_multicond_learned_conditioning(shared.sd_model, prompts, steps, hires_steps, use_old)
            uc = (prompt_parser.get_learned_conditioning(shared.sd_model, negative, steps, hires_steps, use_old)
                  if need_uncond else None)
        if not _finite(c.batch if hasattr(c, "batch") else c):
            _note(state, f"the text encoder with {branch.name} gave non-finite conditioning; its branch uses the "
                         "base prompt conditioning")
            out.append(None)
            continue
        if uc is not None and not _finite(uc):
            _note(state, f"the text encoder with {branch.name} gave non-finite conditioning for the negative prompt; "
                         "its branch uses the base negative conditioning")
            uc = None
        out.append((c, uc))
    return out


# -- memory --------------------------------------------------------------------------------------


def _adapter_bytes(state: GenerationState, dtype: torch.dtype) -> int:
    """Bytes the routed UNet/DiT adapters take on the device in the model's compute dtype."""
    size = torch.tensor([], dtype=dtype).element_size()
    total = 0
    for b in state.branches:
        for entry in b.unet.values():
            for piece in pieces(entry):
                inner = piece.inner if isinstance(piece, OutputSlice) else piece
                tensors = ([inner.down, inner.up, inner.mid] if isinstance(inner, LowRank)
                           else [inner.delta_tensor, inner.bias])
                total += sum(t.numel() * size for t in tensors if t is not None)
    return total


def _peak_estimator(unet, ctx: PassContext, n_branches: int) -> Callable:
    """Forge sizes the model's share of GPU memory for a ``[2B, C, H, W]`` call; branch calls are larger."""
    previous = unet.model_options.get("memory_peak_estimation_modifier", unet.memory_required)

    def estimate(shape):
        # the base rows and every branch's rows in one call (at most max-rows rows when that is set)
        rows = int(shape[0]) * (1 + n_branches)
        if ctx.max_rows > 0:
            rows = max(int(shape[0]), min(rows, ctx.max_rows))
        return previous([rows, *shape[1:]])

    return estimate


def install_pass(p, state: GenerationState, has_uncond: bool) -> PassContext:
    """Clone Forge's UNet patcher for this sampling pass and register the LoRAtorio step on the clone."""
    source = p.sd_model.forge_objects.unet
    unet = source.clone()
    ctx = PassContext(state=state, p=p, max_rows=int(state.settings.max_rows_per_call or 0),
                      source_unet=source, unet=unet)
    ctx.texts = _pass_texts(p, state, has_uncond)
    unet.add_conditioning_modifier(make_scale_recorder(ctx))
    ctx.post_cfg = make_post_cfg(ctx)
    unet.set_model_sampler_post_cfg_function(ctx.post_cfg)
    if hasattr(unet, "add_extra_preserved_memory_during_sampling"):
        # the routed factors sit on the device next to the model while it samples
        unet.add_extra_preserved_memory_during_sampling(
            _adapter_bytes(state, getattr(unet.model, "computation_dtype", torch.float16)))
    if hasattr(unet, "set_memory_peak_estimation_modifier"):
        unet.set_memory_peak_estimation_modifier(_peak_estimator(unet, ctx, len(state.branches)))
    old = state.extra.get("pass")
    if old is not None:
        old.closed = True
    state.extra["pass"] = ctx
    p.sd_model.forge_objects.unet = unet
    return ctx


def _pass_texts(p, state: GenerationState, has_uncond: bool) -> list:
    """Branch text conds of this pass, computed once (Forge calls the hook twice around a hires pass)."""
    key = (getattr(p, "iteration", 0), bool(getattr(p, "is_hr_pass", False)), has_uncond)
    cached = state.extra.get("texts")
    if cached is not None and cached[0] == key:
        return cached[1]
    texts = branch_texts(p, state, has_uncond)
    state.extra["texts"] = (key, texts)
    return texts


def _release_pass(p, state: GenerationState) -> None:
    """Stop the pass's step function and give Forge back the patcher the pass cloned."""
    ctx = state.extra.get("pass")
    if ctx is None:
        return
    ctx.closed = True
    forge_objects = getattr(getattr(p, "sd_model", None), "forge_objects", None)
    if forge_objects is not None and forge_objects.unet is ctx.unet:
        forge_objects.unet = ctx.source_unet


# -- generation lifecycle (called by the script) --------------------------------------------------

CACHE = AdapterCache(1024)


def _shared():
    from modules import shared

    return shared



def _note(state: GenerationState, text: str) -> None:
    if text not in state.notes:
        state.notes.append(text)



def _fail(p, state: GenerationState | None, exc: BaseException, where: str) -> None:
    """An error inside our hooks: stop the generation cleanly and say why."""
    hc.stop_generation(p, state, exc, where, release=_release_pass)


@contextlib.contextmanager
def _guarded(p, where: str):
    try:
        yield
    except Exception as exc:
        _fail(p, get_state(p), exc, where)


def _refusal(p) -> str | None:
    if getattr(p, "refiner_checkpoint_info", None) is not None:
        return hc.Reason.REFINER
    if not is_forge(getattr(p, "sd_model", None) or _shared().sd_model):
        return "the loaded model is not a Forge model"
    return None


def process(p, *args) -> None:
    hc.start_generation(p, args, _shared().opts, CACHE, guarded=_guarded, refusal=_refusal)


def before_process_batch(p, *args, prompts=None, **kwargs) -> None:
    state = get_state(p)
    if not hc.usable(state):
        return
    state.composer = None
    with _guarded(p, "loading LoRAs"):
        bridge = ForgeBridge(p.sd_model)
        prompt = (prompts or getattr(p, "prompts", None) or [""])[0]
        if state.load(prompt, bridge, CACHE) or state.router is None:
            state.router = Router(bridge.unet_targets(), [b.unet for b in state.branches]) if state.branches else None
            state.extra.pop("te_router", None)
            state.extra.pop("texts", None)
        state.extra["bridge"] = bridge
        state.extra["model_key"] = bridge.model_key()
        _flux_note(p, state)
        p.extra_generation_params.update(state.infotext())
        report = state.report()
        if report and (state.skipped or state.partial):
            print(report)


def _flux_note(p, state: GenerationState) -> None:
    config = getattr(p.sd_model.forge_objects.unet.model, "config", None)
    repo = str(getattr(config, "huggingface_repo", "") or "").lower()
    if "flux" in repo and state.settings.patch_size % 2:
        _note(state, f"patch size {state.settings.patch_size} is odd: patches do not line up with Flux's 2x2 tokens")


def after_extra_networks_activate(p, *args, extra_network_data=None, **kwargs) -> None:
    """Take the composed LoRAs away from the built-in LoRA before anything is merged.

    The built-in has just built its patched UNet/CLIP for every tag (Forge merges lazily,
    when a patcher is loaded). It is activated again with the remaining tags, which
    rebuilds ``forge_objects_after_applying_lora`` (processing copies it right after this
    hook); "Lora hashes" keep every LoRA of the prompt. The handled tags are then removed
    from the extra-network data in place: that data is part of the conditioning cache
    key, and a later ordinary generation must not get conds cached without them.
    """
    state = get_state(p)
    if not hc.usable(state) or not state.branches or extra_network_data is None:
        return
    with _guarded(p, "keeping the built-in LoRA off the composed LoRAs"):
        from modules import extra_networks

        names = state.handled_names
        entries = extra_network_data.get("lora")
        if not entries:
            return
        keep = [e for e in entries if not (e.items and e.items[0] in names)]
        if len(keep) == len(entries):
            return
        builtin = extra_networks.extra_network_registry.get("lora")
        if builtin is not None:
            hashes = dict(getattr(p, "lora_hashes", None) or {})
            info = p.extra_generation_params.get("Lora hashes")
            builtin.activate(p, list(keep))
            if hashes:
                p.lora_hashes = hashes
            if info is not None:
                p.extra_generation_params["Lora hashes"] = info
            hc.set_lora_hashes(p, state, ForgeBridge(p.sd_model).networks(), _shared().opts)
        entries[:] = keep
        if not keep:
            del extra_network_data["lora"]


def process_batch(p, *args, **kwargs) -> None:
    state = get_state(p)
    if not hc.usable(state) or not state.branches:
        return
    with _guarded(p, "starting a batch"):
        state.new_composer()
        state.extra["pass_id"] = None


def process_before_every_sampling(p, *args, **kwargs) -> None:
    """Start of a sampling pass (twice around a hires pass): per-branch text conds and the step on a UNet clone."""
    state = get_state(p)
    if not hc.usable(state) or not state.branches or state.composer is None:
        return
    with _guarded(p, "preparing a sampling pass"):
        bridge = state.extra.get("bridge")
        if bridge is not None and ForgeBridge(p.sd_model).model_key() != state.extra.get("model_key"):
            _note(state, "the model changed during the generation (hires checkpoint?); not applied after the change")
            _release_pass(p, state)
            return
        pass_id = (getattr(p, "iteration", 0), bool(getattr(p, "is_hr_pass", False)))
        if state.extra.get("pass_id") != pass_id:
            state.extra["pass_id"] = pass_id
            if pass_id[1]:
                state.composer.new_pass()
        install_pass(p, state, has_uncond=kwargs.get("uc") is not None)



def postprocess_batch(p, *args, **kwargs) -> None:
    state = get_state(p)
    if state is None:
        return
    _release_pass(p, state)
    with _guarded(p, "finishing a batch"):
        state.record_map()
        state.count_dropped()
        _uncond_note(state)
        p.extra_generation_params.update(state.infotext())


def _uncond_note(state: GenerationState) -> None:
    missing = state.extra.get("steps_without_uncond", 0)
    if not missing:
        return
    total = state.extra.get("steps", 0)
    for note in [n for n in state.notes if n.startswith("re-centring not applied")]:
        state.notes.remove(note)
    if missing >= total:
        state.notes.append("re-centring not applied: no unconditional pass (CFG scale 1); the conditional "
                           "branches were composed")
    else:
        state.notes.append(f"re-centring not applied at {missing} of {total} model calls without an "
                           "unconditional pass (CFG scale 1 there)")


def postprocess(p, processed, *args) -> None:
    state = get_state(p)
    if state is None:
        return
    step = "restoring the model after the last pass"
    try:
        _release_pass(p, state)
        step = "writing the report"
        hc.show_report(p, processed, state)
        if state.maps and state.error is None:
            step = "adding the composition map"
            hc.append_maps(state, processed)
    except Exception as exc:  # the images are made; a failure here must not lose them
        report_after_images(p, processed, exc, step)
    finally:
        state.close()
        state.extra.pop("images", None)



# -- registration and UI helpers --------------------------------------------------------------------


def lora_names() -> list[str]:
    try:
        import networks

        return sorted(networks.available_networks)
    except Exception:
        return []


def refresh_loras() -> None:
    import networks

    networks.list_available_networks()


def defaults():

    return hc.configured_defaults(_shared().opts)


def _on(register, fn, name: str) -> None:
    try:
        register(fn, name=name)
    except TypeError:
        register(fn)


def register_callbacks() -> None:
    """WebUI callbacks (once per script load). Forge needs no CFG callbacks: the step lives on the UNet clone."""
    from modules import script_callbacks as cb


    def on_model_loaded(sd_model):
        CACHE.clear()

    def on_ui_settings():
        hc.register_options(_shared())

    def on_before_ui():
        try:
            from modules import scripts

            hc.register_xyz_axes(scripts.scripts_data)
        except Exception as exc:
            print(f"LoRAtorio: could not add the XYZ plot axes: {exc}")

    _on(cb.on_model_loaded, on_model_loaded, "loratorio_model_loaded")
    _on(cb.on_ui_settings, on_ui_settings, "loratorio_ui_settings")
    _on(cb.on_before_ui, on_before_ui, "loratorio_xyz")


postprocess_image = hc.keep_image_for_map
