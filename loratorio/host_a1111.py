"""AUTOMATIC1111 WebUI adapter (1.6 - 1.10): the lifecycle hooks the script calls.

How LoRAtorio runs inside A1111:

- **Branches** come from the ``<lora:...>`` tags of the batch's first prompt (and the
  candidate pool); the built-in Lora extension loads them (``host_a1111_lora``).
- **The built-in stays off the composed tags**: in ``after_extra_networks_activate`` the
  composed networks are removed from ``networks.loaded_networks`` and from the
  extra-network data of the processing object (which is part of the conditioning cache
  key), so the infotext keeps "Lora hashes" and nothing is merged.
- **Per-branch text encoder**: ``host_a1111_text``.
- **Each step**: ``host_a1111_step`` (one model call for base and branch rows).

Exceptions inside these hooks stop the generation through the WebUI's interrupt (a
script hook's exception alone would not stop it), with the cause in the console, the
comments and the infotext; routed forwards and temporary merges never outlive one call.
"""

from __future__ import annotations

import logging
import weakref

from . import host_a1111_step as per_step
from .generation import get_state, usable
from .host_a1111_lora import A1111Bridge, _networks, _shared, lora_names, refresh_loras
from .host_a1111_step import guarded, on_cfg_denoised, on_cfg_denoiser
from .host_a1111_text import first_pass_conds
from .host_lifecycle import (
    append_maps,
    keep_image_for_map,
    report_after_images,
    set_lora_hashes,
    show_report,
    start_generation,
)
from .host_options import CACHE_DEFAULT_MB, configured_defaults, register_xyz_axes
from .host_ui import register_options
from .loading import AdapterCache, Reason

__all__ = ["CACHE", "lora_names", "refresh_loras"]

log = logging.getLogger("loratorio")

CACHE = AdapterCache(CACHE_DEFAULT_MB)

# -- generation lifecycle (called by the script) ------------------------------------------------


def _refusal(p) -> str | None:
    shared = _shared()
    model = shared.sd_model
    if getattr(p, "refiner_checkpoint_info", None) is not None:
        return Reason.REFINER
    if getattr(model, "cond_stage_key", None) == "edit":
        return "InstructPix2Pix-style edit models are not supported"
    if getattr(getattr(model, "model", None), "conditioning_key", None) == "crossattn-adm":
        return "unCLIP models are not supported"
    if hasattr(model, "forge_objects"):
        return "this is Forge; the A1111 adapter cannot run here"
    return None


def process(p, *args) -> None:
    per_step._current["p"] = None  # a new job: never follow an older one's state
    per_step._close_watches()  # nor keep anything an older job's failed step left on the UNet
    state = start_generation(p, args, _shared().opts, CACHE, guarded=guarded, refusal=_refusal)
    if state is not None:
        per_step._current["p"] = weakref.ref(p)


def before_process_batch(p, *args, prompts=None, **kwargs) -> None:
    state = get_state(p)
    if not usable(state):
        return
    state.composer = None
    with guarded(p, "loading LoRAs"):
        bridge = A1111Bridge()
        prompt = (prompts or p.prompts or [""])[0]
        if state.load(prompt, bridge, CACHE) or state.router is None:
            state.router = None
            if state.branches:
                from .routing import Router

                state.router = Router(bridge.unet_targets(), [b.unet for b in state.branches])
        state.extra["bridge"] = bridge
        state.extra.pop("conds", None)
        p.extra_generation_params.update(state.infotext())
        report = state.report()
        if report and (state.skipped or state.partial):
            print(report)


def after_extra_networks_activate(p, *args, extra_network_data=None, **kwargs) -> None:
    """Take the composed LoRAs away from the built-in before it merges anything (it merges lazily)."""
    state = get_state(p)
    if not usable(state) or not state.branches:
        return
    with guarded(p, "keeping the built-in Lora off the composed LoRAs"):
        names = state.handled_names
        nets = _networks()
        nets.loaded_networks[:] = [n for n in nets.loaded_networks
                                   if (getattr(n, "mentioned_name", None) or n.name) not in names]
        set_lora_hashes(p, state, nets, _shared().opts)
        if extra_network_data is not None:
            for key in ("lora", "lyco"):
                entries = extra_network_data.get(key)
                if not entries:
                    continue
                entries[:] = [e for e in entries if not (e.items and e.items[0] in names)]
                if not entries:
                    del extra_network_data[key]


def process_batch(p, *args, **kwargs) -> None:
    state = get_state(p)
    if not usable(state) or not state.branches:
        return
    with guarded(p, "text encoder"):
        bridge = state.extra.get("bridge") or A1111Bridge()
        state.new_composer()  # first: the branch texts depend on whether its method uses the merged row
        state.extra["conds"] = first_pass_conds(p, state, bridge)
        state.extra["pass"] = "first"
        state.extra["model_id"] = id(_shared().sd_model)


def postprocess_batch(p, *args, **kwargs) -> None:
    state = get_state(p)
    if state is None:
        return
    with guarded(p, "recording the composition map"):
        state.record_map(state.extra.get("map_rows"))
        state.count_dropped()
        p.extra_generation_params.update(state.infotext())


def postprocess(p, processed, *args) -> None:
    state = get_state(p)
    if state is None:
        return
    step = "writing the report"
    try:
        show_report(p, processed, state)
        if state.maps and state.error is None:
            step = "adding the composition map"
            append_maps(state, processed)
    except Exception as exc:  # the images are made; a failure here must not lose them
        report_after_images(p, processed, exc, step)
    finally:
        state.close()
        state.extra.pop("images", None)
        current = per_step._current["p"]
        if current is not None and current() is p:
            per_step._current["p"] = None


# -- registration ----------------------------------------------------------------------------------


def _on(register, fn, name: str) -> None:
    try:
        register(fn, name=name)
    except TypeError:  # 1.6-1.8 take no name
        register(fn)


def _on_model_loaded(sd_model) -> None:
    per_step._close_watches()
    CACHE.clear()


def _on_ui_settings() -> None:
    register_options(_shared())


def _on_before_ui() -> None:
    try:
        from modules import scripts

        register_xyz_axes(scripts.scripts_data)
    except Exception:
        log.exception("LoRAtorio: could not add the XYZ plot axes")


def register_callbacks() -> None:
    """Register the WebUI callbacks (once per script load; the WebUI clears them on reload)."""
    from modules import script_callbacks as cb

    _on(cb.on_cfg_denoiser, on_cfg_denoiser, "loratorio_cfg_denoiser")
    _on(cb.on_cfg_denoised, on_cfg_denoised, "loratorio_cfg_denoised")
    _on(cb.on_model_loaded, _on_model_loaded, "loratorio_model_loaded")
    _on(cb.on_ui_settings, _on_ui_settings, "loratorio_ui_settings")
    _on(cb.on_before_ui, _on_before_ui, "loratorio_xyz")


def defaults():
    return configured_defaults(_shared().opts)


postprocess_image = keep_image_for_map
