"""The Forge family's backends: which one is running, and one call shape for what differs.

Four WebUIs share the Forge adapter (``host_forge*``). They keep Forge's design (UNet
patchers, a post-CFG function, ``calc_cond_uncond_batch``, x0 predictions) but two
different backends sit under it, and their forks moved apart since:

============  ==========================================  =====================================
name          backend (what tells it apart)                LoRA patches from the loader
============  ==========================================  =====================================
``forge``     ``backend`` + ``packages_3rdparty``          ``("lora", (up, down, alpha, mid, dora))``
``neo``       ``backend`` + ``modules_forge.packages``     weight-adapter objects (``.name``, ``.weights``)
``classic``   ``ldm_patched`` (no ``weight_adapter``)      ``("lora", (up, down, alpha, mid[, dora, reshape]))``
``reforge``   ``ldm_patched.modules.weight_adapter``       weight-adapter objects; ``load_lora`` returns
                                                           the patches only
============  ==========================================  =====================================

Forge is lllyasviel's f2 (``dfdcbab6``), Neo the ``neo`` branch of Forge Classic's
repository, Classic its ``classic`` branch (Forge's gradio-3 generation with
``ldm_patched``), reForge Panchovix's ``main`` (the same generation, with a newer
ComfyUI port). :func:`detect` tells them apart by the modules they have, never by
version strings (forks keep the ones they started from); the :class:`Backend` it returns
gives the adapter one call shape for every operation that differs. Host modules are
imported on use: this file must import anywhere.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import torch

__all__ = ["LORA_KEY_SUFFIXES", "Backend", "backups", "compute_dtype", "detect", "layer_of", "learned_conditioning",
           "low_rank_parts", "needs_base_weight", "patch_kind", "sd_conditioning", "text_pass_kept"]


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package that is not one, or a half-initialised module
        return False


def _name() -> str:
    # ldm_patched first: no Forge-family WebUI has both, and a test fake lays it over Forge's modules
    if _has("ldm_patched.modules.model_patcher"):
        return "reforge" if _has("ldm_patched.modules.weight_adapter") else "classic"
    if _has("backend.sampling.sampling_function"):
        return "neo" if _has("modules_forge.packages") else "forge"
    raise ImportError("neither Forge's 'backend' nor 'ldm_patched' is importable: not a Forge-family WebUI")


# -- LoRA patch values, whatever the loader made -------------------------------------------------


def patch_kind(value) -> str:
    """The type of one loader patch: ``lora``, ``loha``, ``lokr``, ``glora``, ``oft``, ``diff``, ``set``, ...

    Tuples ``(kind, tensors)`` (or a bare ``(tensor,)`` diff) on Forge and Classic;
    weight-adapter objects with a ``name`` on Neo and reForge (``len()`` of those raises).
    """
    name = getattr(value, "name", None)
    if isinstance(name, str):
        return name
    return value[0] if len(value) == 2 and isinstance(value[0], str) else "diff"


def _tensors(value) -> tuple:
    weights = getattr(value, "weights", None)
    if weights is not None:
        return tuple(weights)
    return tuple(value[1]) if len(value) == 2 and isinstance(value[0], str) else tuple(value)


def low_rank_parts(value) -> tuple | None:
    """``(up, down, alpha, mid)`` of a plain LoRA/LoCon patch; None for anything else.

    Anything else includes DoRA (a ``dora_scale``) and BFL control LoRAs (a ``reshape``),
    which change the weight beyond ``up @ down`` and go through the host's own merge.
    Forge stores 5 tensors (dora last), Classic 4 (2025-02) or 6 (dora, reshape), Neo
    and reForge 6 on the adapter's ``weights``.
    """
    if patch_kind(value) != "lora":
        return None
    parts = _tensors(value)
    if len(parts) < 4 or any(extra is not None for extra in parts[4:6]):
        return None
    return parts[0], parts[1], parts[2], parts[3]


def needs_base_weight(value) -> bool:
    """Whether the patch's delta depends on the weight it is merged into (DoRA, GLoRA, OFT, BOFT)."""
    kind = patch_kind(value)
    if kind in ("glora", "oft", "boft", "oftv2"):
        return True
    parts = _tensors(value)
    if kind == "lora":  # dora_scale follows (up, down, alpha, mid)
        return len(parts) > 4 and parts[4] is not None
    if kind in ("loha", "lokr"):  # dora_scale is last
        return bool(parts) and parts[-1] is not None
    return False


# -- the backend ------------------------------------------------------------------------------------


@dataclass
class Backend:
    """One Forge-family backend, as the adapter calls it.

    ``lora_patches(sd, unet_model, text_encoders)`` -> ``(unet_patches, te_patches,
    rest)``: the host loader's patches for the UNet/DiT and the text encoders and the
    file's tensors neither matched. ``merge(value, base, key, offset, function)`` is the
    host's own merge of one patch at strength 1 into ``base`` (float32). The sampling
    functions keep Forge's signatures.
    """

    name: str
    load_file: Callable[[str], dict]
    lora_patches: Callable
    merge: Callable
    get_free_memory: Callable
    calc_cond_uncond_batch: Callable
    compile_conditions: Callable
    compile_weighted_conditions: Callable
    compute_cond_mark: Callable | None = None
    compute_cond_indices: Callable | None = None
    mismatch_refused: Callable[[int, int], bool] = lambda rest, total: rest > 12
    # Whether the built-in LoRA rebuilds its patchers from the unpatched objects on each activation
    # (Forge, Neo, reForge); Classic's applies its LoRAs on top of whatever the model holds.
    builtin_starts_clean: bool = True

    @property
    def family(self) -> str:
        """``forge2`` (Forge's ``backend``) or ``forge1`` (``ldm_patched``)."""
        return "forge2" if self.name in ("forge", "neo") else "forge1"


def detect() -> Backend:
    """The running WebUI's backend, built from the host modules loaded now (imports are cached by Python)."""
    return _BUILDERS[_name()]()


def _two_maps(lora_mod, sd: Mapping, unet_model, text_encoders, load: Callable) -> tuple[dict, dict, dict]:
    """UNet/DiT keys first, the rest against the text encoders, as the built-in LoRA loads a file.

    Key maps are built fresh: the hosts' helpers have a mutable default argument that
    accumulates keys across models.
    """
    unet_patches, rest = load(dict(sd), lora_mod.model_lora_keys_unet(unet_model, {}))
    te_patches: dict = {}
    if text_encoders is not None:
        te_patches, rest = load(rest, lora_mod.model_lora_keys_clip(text_encoders, {}))
    return unet_patches, te_patches, rest


def _host_calls(utils, memory, sampling) -> dict:
    """The Backend fields every backend takes from the same-named functions of its own host modules."""
    return dict(
        load_file=lambda path: utils.load_torch_file(path, safe_load=True),
        get_free_memory=memory.get_free_memory,
        calc_cond_uncond_batch=sampling.calc_cond_uncond_batch,
        compute_cond_mark=getattr(sampling, "compute_cond_mark", None),
        compute_cond_indices=getattr(sampling, "compute_cond_indices", None),
    )


def _forge2(name: str) -> Backend:
    import backend.memory_management as memory
    import backend.utils as utils
    from backend.patcher import lora
    from backend.sampling import condition
    from backend.sampling import sampling_function as sampling

    def merge(value, base, key, offset, function):
        return lora.merge_lora_to_weight([[1.0, value, 1.0, offset, function]], base, str(key),
                                         computation_dtype=torch.float32)

    return Backend(
        name=name,
        lora_patches=lambda sd, unet, te: _two_maps(lora, sd, unet, te, lora.load_lora),
        merge=merge,
        compile_conditions=condition.compile_conditions,
        compile_weighted_conditions=condition.compile_weighted_conditions,
        **_host_calls(utils, memory, sampling),
        # Neo's built-in refuses a file when more than half its tensors match nothing
        # (networks.py:58); Forge's when more than 12 do (networks.py:25-27)
        mismatch_refused=(lambda rest, total: rest > total / 2) if name == "neo" else (lambda rest, total: rest > 12),
    )


def _forge1(name: str) -> Backend:
    import ldm_patched.modules.lora as lora
    import ldm_patched.modules.model_management as memory
    import ldm_patched.modules.samplers as sampling
    import ldm_patched.modules.utils as utils
    from modules_forge import forge_sampler

    if name == "reforge":
        import ldm_patched.modules.lora_convert as lora_convert

        def load(sd, key_map):
            # reForge's load_lora returns only the patches; what it left is what no key of the map names
            patches = lora.load_lora(sd, key_map, log_missing=False)
            return patches, _unmatched(sd, key_map)

        def lora_patches(sd, unet, te):
            return _two_maps(lora, lora_convert.convert_lora(dict(sd)), unet, te, load)

        def merge(value, base, key, offset, function):
            return lora.calculate_weight([(1.0, value, 1.0, offset, function)], base, str(key),
                                         intermediate_dtype=torch.float32)
    else:
        from ldm_patched.modules.model_patcher import ModelPatcher

        def lora_patches(sd, unet, te):
            return _two_maps(lora, sd, unet, te, lora.load_lora)

        def merge(value, base, key, offset, function):
            # Classic merges through a patcher method that uses no patcher state (model_patcher.py:294)
            return ModelPatcher.calculate_weight(None, [(1.0, value, 1.0)], base, str(key))

    return Backend(
        name=name,
        lora_patches=lora_patches,
        merge=merge,
        compile_conditions=forge_sampler.cond_from_a1111_to_patched_ldm,
        compile_weighted_conditions=forge_sampler.cond_from_a1111_to_patched_ldm_weighted,
        **_host_calls(utils, memory, sampling),
        builtin_starts_clean=name != "classic",  # Classic's networks.load_networks (networks.py:31-70)
    )


_BUILDERS: dict[str, Callable[[], Backend]] = {
    "forge": lambda: _forge2("forge"),
    "neo": lambda: _forge2("neo"),
    "classic": lambda: _forge1("classic"),
    "reforge": lambda: _forge1("reforge"),
}

# Key endings of the tensors LoRA-like files hold (kohya, PEFT, diffusers, LyCORIS, BFL control).
LORA_KEY_SUFFIXES = (
    ".lora_up.weight", ".lora_down.weight", ".lora_mid.weight", ".lora_A.weight", ".lora_B.weight",
    "_lora.up.weight", "_lora.down.weight", ".lora.up.weight", ".lora.down.weight",
    ".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight", ".alpha", ".dora_scale",
    ".hada_w1_a", ".hada_w1_b", ".hada_w2_a", ".hada_w2_b", ".hada_t1", ".hada_t2",
    ".lokr_w1", ".lokr_w2", ".lokr_w1_a", ".lokr_w1_b", ".lokr_w2_a", ".lokr_w2_b", ".lokr_t2",
    ".a1.weight", ".a2.weight", ".b1.weight", ".b2.weight", ".diff", ".diff_b", ".w_norm", ".b_norm",
    ".set_weight", ".reshape_weight",
)


def layer_of(key: str) -> str:
    """The layer a LoRA file's tensor belongs to: its name before the LoRA part's suffix (the whole name
    when it has none)."""
    return next((key[: -len(s)] for s in LORA_KEY_SUFFIXES if key.endswith(s)), key)


def _unmatched(sd: Mapping, key_map: Mapping) -> dict:
    """The tensors of ``sd`` whose layer no key of ``key_map`` names."""
    names = set(key_map)
    return {key: value for key, value in sd.items() if layer_of(key) not in names}


# -- pieces of the WebUI around the backend --------------------------------------------------------


def backups(patcher) -> dict:
    """Unpatched weights the host keeps while its built-in LoRA is merged in, by parameter name.

    Forge keeps them on the patcher's ``lora_loader.backup``; Classic on ``backup`` as
    tensors; Neo and reForge on ``backup`` as ``(weight, inplace_update)`` tuples.
    """
    if patcher is None:
        return {}
    loader = getattr(patcher, "lora_loader", None)
    if loader is None:
        loader = getattr(getattr(patcher, "model", None), "lora_loader", None)
    if loader is not None:
        return dict(getattr(loader, "backup", {}) or {})
    out = {}
    for key, entry in dict(getattr(patcher, "backup", {}) or {}).items():
        weight = entry if isinstance(entry, torch.Tensor) else getattr(entry, "weight", None)
        if isinstance(weight, torch.Tensor):
            out[key] = weight
    return out


def compute_dtype(model, default: torch.dtype = torch.float16) -> torch.dtype:
    """The dtype the UNet/DiT computes in (Forge: ``computation_dtype``; ``ldm_patched``: manual cast or storage)."""
    dtype = getattr(model, "computation_dtype", None) or getattr(model, "manual_cast_dtype", None)
    if dtype is None and callable(getattr(model, "get_dtype", None)):
        dtype = model.get_dtype()
    return dtype if isinstance(dtype, torch.dtype) else default


def _accepts(fn: Callable, parameter: str) -> bool:
    try:
        return parameter in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def learned_conditioning(prompt_parser, model, prompts, negative, steps, hires_steps, use_old: bool,
                         need_uncond: bool):
    """The WebUI's ``(multicond, cond | None)`` for prompts, with the arguments this WebUI's parser takes.

    Neo's parser has no ``use_old_scheduling`` argument (the option is gone there).
    """
    extra = (use_old,) if _accepts(prompt_parser.get_learned_conditioning, "use_old_scheduling") else ()
    c = prompt_parser.get_multicond_learned_conditioning(model, prompts, steps, hires_steps, *extra)
    uc = prompt_parser.get_learned_conditioning(model, negative, steps, hires_steps, *extra) if need_uncond else None
    return c, uc


def sd_conditioning(prompt_parser, texts, *, width, height, distilled, negative: bool = False):
    """``prompt_parser.SdConditioning`` with the distilled CFG scale where this WebUI's class takes it."""
    kwargs = {"width": width, "height": height, "is_negative_prompt": negative}
    if _accepts(prompt_parser.SdConditioning.__init__, "distilled_cfg_scale"):
        kwargs["distilled_cfg_scale"] = distilled
    return prompt_parser.SdConditioning(list(texts), **kwargs)


def _module(name: str):
    try:
        return importlib.import_module(name)
    except Exception:
        return None


@contextlib.contextmanager
def text_pass_kept(sd_model) -> Iterator[None]:
    """Undo what a text-encoder pass leaves behind, so a branch's own text pass changes nothing else.

    The text engines write infotext entries into module globals (Forge:
    ``classic_engine.last_extra_generation_params``; Neo:
    ``backend.args.dynamic_args.last_extra_generation_params``; ``ldm_patched`` forks:
    ``sd_hijack.model_hijack.extra_generation_params`` and ``comments``), and Neo's edit
    models consume their reference images (``ini_latent``, ``ref_latents``) when a
    positive prompt is encoded.
    """
    saved: list[tuple[object, str, object]] = []
    owners = [
        (_module("backend.text_processing.classic_engine"), ("last_extra_generation_params",)),
        (getattr(_module("backend.args"), "dynamic_args", None), ("last_extra_generation_params", "ref_latents")),
        (getattr(_module("modules.sd_hijack"), "model_hijack", None), ("extra_generation_params", "comments")),
        (sd_model, ("ini_latent", "ref_latents")),
    ]
    for owner, names in owners:
        for name in names:
            if owner is None:
                continue
            value = owner.get(name, _MISSING) if isinstance(owner, dict) else getattr(owner, name, _MISSING)
            if value is _MISSING:
                continue
            copied = value.copy() if isinstance(value, (dict, list)) else value
            saved.append((owner, name, copied))
    try:
        yield
    finally:
        for owner, name, value in saved:
            if isinstance(owner, dict):
                owner[name] = value
            else:
                setattr(owner, name, value)


_MISSING = object()
