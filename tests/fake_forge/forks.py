"""The Forge forks' call protocols, laid over the fake Forge.

Forge Classic and reForge keep Forge's design on the older ``ldm_patched`` backend,
Forge Neo on Forge's ``backend``; where LoRAtorio touches them they differ in module
names, in the shape of the LoRA loader's patches, in the merge function, in the sampler's
post-CFG arguments and chunk marks, and in the WebUI's prompt parser and built-in LoRA.
:func:`install_fork` adds one fork's modules and call shapes to the installed fake (the
fake's own internals keep running as Forge), so a generation through LoRAtorio meets
exactly those differences. References in brackets are to the forks' files: Classic
``5136ce20``, reForge ``3b56b268``, Neo release 2.26.
"""

from __future__ import annotations

import importlib.machinery
import inspect
import sys
import types

FORKS = ("classic", "reforge", "neo")


# -- LoRA patches in each fork's shape --------------------------------------------------------------


class WeightAdapter:
    """A ComfyUI weight adapter (Neo, reForge: ``weight_adapter/base.py``): ``name`` and ``weights``, no ``len()``."""

    def __init__(self, name, weights):
        self.name = name
        self.weights = tuple(weights)
        self.loaded_keys = set()

    def __len__(self):
        raise TypeError(f"object of type '{type(self).__name__}' has no len()")


def to_adapter(value):
    """A Forge ``(kind, tensors)`` patch as an adapter object; ``diff``/``set`` stay tuples. LoRA gets ``reshape``."""
    kind, tensors = value if len(value) == 2 and isinstance(value[0], str) else ("diff", value)
    if kind in ("diff", "set"):
        return value
    return WeightAdapter(kind, (*tensors, None) if kind == "lora" else tensors)


def to_classic(value):
    """A Forge patch in Classic's tuples: LoRA gets ``(up, down, alpha, mid, dora, reshape)`` (``lora.py:21-215``)."""
    if len(value) == 2 and value[0] == "lora":
        return ("lora", (*value[1], None))
    return value


def to_forge(value):
    """Back to the fake Forge merge's tuples, from any fork's patch."""
    if isinstance(value, WeightAdapter):
        weights = value.weights[:5] if value.name == "lora" else value.weights
        return (value.name, weights)
    if len(value) == 2 and value[0] == "lora" and len(value[1]) > 5:
        return ("lora", tuple(value[1][:5]))
    return value


def _module(monkeypatch, name, **attrs):
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, None)  # find_spec reads it from sys.modules
    module.__dict__.update(attrs)
    parent, _, child = name.rpartition(".")
    if parent:
        monkeypatch.setattr(sys.modules[parent], child, module, raising=False)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def _package(monkeypatch, name):
    module = _module(monkeypatch, name)
    module.__path__ = []
    module.__spec__.submodule_search_locations = []
    return module


# -- forks ----------------------------------------------------------------------------------------------


def _ldm_patched(monkeypatch, *, reforge: bool):
    """``ldm_patched.modules.*`` and ``modules_forge.forge_sampler`` over the fake's functions."""
    import modules_forge
    from backend import memory_management, utils
    from backend.patcher import lora as forge_lora
    from backend.sampling import condition, sampling_function

    _package(monkeypatch, "ldm_patched")
    _package(monkeypatch, "ldm_patched.modules")
    if reforge:
        _module(monkeypatch, "ldm_patched.modules.weight_adapter", WeightAdapterBase=WeightAdapter)
        _module(monkeypatch, "ldm_patched.modules.lora_convert", convert_lora=lambda sd: dict(sd))

        def load_lora(lora, to_load, log_missing=True):  # patches only (lora.py:37)
            patches, _rest = forge_lora.load_lora(lora, to_load)
            return {k: to_adapter(v) for k, v in patches.items()}

        def calculate_weight(patches, weight, key, intermediate_dtype=None, original_weights=None):  # lora.py:331
            entries = [[s, to_forge(v), sm, offset, fn] for s, v, sm, offset, fn in patches]
            return forge_lora.merge_lora_to_weight(entries, weight, key)

        lora = _module(monkeypatch, "ldm_patched.modules.lora", load_lora=load_lora, calculate_weight=calculate_weight)
        patcher = _module(monkeypatch, "ldm_patched.modules.model_patcher", ModelPatcher=object)
    else:
        def load_lora(lora, to_load):  # (patches, remaining) with 6-tuple LoRA patches
            patches, rest = forge_lora.load_lora(lora, to_load)
            return {k: to_classic(v) for k, v in patches.items()}, rest

        class ModelPatcher:
            def calculate_weight(self, patches, weight, key):  # model_patcher.py:294, 3-tuples
                entries = [[s, to_forge(v), sm, None, None] for s, v, sm in patches]
                return forge_lora.merge_lora_to_weight(entries, weight, key)

        lora = _module(monkeypatch, "ldm_patched.modules.lora", load_lora=load_lora)
        patcher = _module(monkeypatch, "ldm_patched.modules.model_patcher", ModelPatcher=ModelPatcher)
    lora.model_lora_keys_unet = forge_lora.model_lora_keys_unet
    lora.model_lora_keys_clip = forge_lora.model_lora_keys_clip
    samplers = {"calc_cond_uncond_batch": sampling_function.calc_cond_uncond_batch}
    if not reforge:  # reForge has neither (its chunks carry uuids)
        samplers.update(compute_cond_mark=sampling_function.compute_cond_mark,
                        compute_cond_indices=sampling_function.compute_cond_indices)
    _module(monkeypatch, "ldm_patched.modules.samplers", **samplers)
    _module(monkeypatch, "ldm_patched.modules.utils", load_torch_file=utils.load_torch_file)
    _module(monkeypatch, "ldm_patched.modules.model_management", get_free_memory=memory_management.get_free_memory)
    monkeypatch.setattr(modules_forge, "__path__", [], raising=False)
    _module(monkeypatch, "modules_forge.forge_sampler",
            cond_from_a1111_to_patched_ldm=condition.compile_conditions,
            cond_from_a1111_to_patched_ldm_weighted=condition.compile_weighted_conditions)
    return patcher


def _sd_conditioning_without_distilled(monkeypatch):
    """Classic and reForge: ``SdConditioning`` has no ``distilled_cfg_scale`` (``prompt_parser.py:144/147``)."""
    from modules import prompt_parser

    base = prompt_parser.SdConditioning

    class SdConditioning(base):
        def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
            super().__init__(prompts, is_negative_prompt=is_negative_prompt, width=width, height=height,
                             copy_from=copy_from)

    monkeypatch.setattr(prompt_parser, "SdConditioning", SdConditioning)


def _classic_builtin(monkeypatch):
    """Classic's built-in LoRA: applies on top of the current objects (it never resets them itself), writes
    "Lora hashes" straight into the infotext and keeps no ``p.lora_hashes`` (``networks.py:31-70``,
    ``extra_networks_lora.py:48-63``)."""
    import extra_networks_lora
    import networks
    from modules import shared

    def load_networks(names, te_multipliers=None, unet_multipliers=None, dyn_dims=None):
        sd = shared.sd_model
        networks.loaded_networks.clear()
        on_disk = [networks.available_network_aliases.get(n) for n in names]
        for entry, name in zip(on_disk, names):
            net = networks.Network(name, entry)
            net.mentioned_name = name
            networks.loaded_networks.append(net)
        targets = [[e.filename, u, t] for e, u, t in zip(on_disk, unet_multipliers, te_multipliers) if e]
        if sd.current_lora_hash == str(targets):
            return
        sd.current_lora_hash = str(targets)
        networks.LOADS.append((list(names), list(te_multipliers), list(unet_multipliers)))
        for filename, unet_m, te_m in targets:
            sd.forge_objects.unet, sd.forge_objects.clip = networks.load_lora_for_models(
                sd.forge_objects.unet, sd.forge_objects.clip, networks.load_torch_file(filename), unet_m, te_m,
                filename)
        sd.forge_objects_after_applying_lora = sd.forge_objects.shallow_copy()

    original = extra_networks_lora.ExtraNetworkLora.activate

    def activate(self, p, params_list):
        original(self, p, params_list)
        if hasattr(p, "lora_hashes"):
            del p.lora_hashes
        hashes = [f"{n.mentioned_name.replace(':', '').replace(',', '')}: {n.network_on_disk.shorthash}"
                  for n in networks.loaded_networks if n.network_on_disk.shorthash]
        if hashes:
            p.extra_generation_params["Lora hashes"] = ", ".join(hashes)

    monkeypatch.setattr(networks, "load_networks", load_networks)
    monkeypatch.setattr(extra_networks_lora.ExtraNetworkLora, "activate", activate)


def _neo(monkeypatch):
    """Neo: adapter objects from ``load_lora`` (merged by ``merge_lora_to_weight``), a prompt parser without
    ``use_old_scheduling`` (``prompt_parser.py:163, 252``), no peak-memory modifier on the UNet patcher."""
    import modules_forge
    from backend.patcher import lora as forge_lora
    from backend.patcher.unet import UnetPatcher
    from modules import prompt_parser

    monkeypatch.setattr(modules_forge, "__path__", [], raising=False)
    _package(monkeypatch, "modules_forge.packages")
    load, merge = forge_lora.load_lora, forge_lora.merge_lora_to_weight

    def load_lora(lora, to_load):
        patches, rest = load(lora, to_load)
        return {k: to_adapter(v) for k, v in patches.items()}, rest

    def merge_lora_to_weight(patches, weight, key="online_lora", computation_dtype=None):
        entries = [[s, to_forge(v), sm, offset, fn] for s, v, sm, offset, fn in patches]
        return merge(entries, weight, key) if computation_dtype is None else merge(entries, weight, key,
                                                                                     computation_dtype)

    monkeypatch.setattr(forge_lora, "load_lora", load_lora)
    monkeypatch.setattr(forge_lora, "merge_lora_to_weight", merge_lora_to_weight)
    learned, multicond = prompt_parser.get_learned_conditioning, prompt_parser.get_multicond_learned_conditioning

    def get_learned_conditioning(model, prompts, steps, hires_steps=None):
        return learned(model, prompts, steps, hires_steps)

    def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None):
        return multicond(model, prompts, steps, hires_steps)

    monkeypatch.setattr(prompt_parser, "get_learned_conditioning", get_learned_conditioning)
    monkeypatch.setattr(prompt_parser, "get_multicond_learned_conditioning", get_multicond_learned_conditioning)
    monkeypatch.delattr(UnetPatcher, "set_memory_peak_estimation_modifier")


def install_fork(monkeypatch, name: str) -> None:
    """Lay fork ``name``'s protocol over the installed fake Forge (``forge``: nothing to change)."""
    from backend.sampling import sampling_function

    if name == "forge":
        return
    if name not in FORKS:
        raise ValueError(f"unknown fork {name!r}")
    protocol = sampling_function.PROTOCOL
    monkeypatch.setitem(protocol, "post_cfg_scale", True)
    if name == "neo":
        _neo(monkeypatch)
        return
    _ldm_patched(monkeypatch, reforge=name == "reforge")
    _sd_conditioning_without_distilled(monkeypatch)
    if name == "reforge":
        monkeypatch.setitem(protocol, "uuids", True)
        monkeypatch.setitem(protocol, "uncond_none", True)
    else:
        _classic_builtin(monkeypatch)


def accepts(fn, parameter: str) -> bool:
    """Whether ``fn`` takes ``parameter`` (the harness builds references with any fork's prompt parser)."""
    return parameter in inspect.signature(fn).parameters
