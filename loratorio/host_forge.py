"""Forge adapter: LoRAtorio on Stable Diffusion WebUI Forge (SD1.x, SDXL, Flux), the
lifecycle hooks the script calls.

Per sampling pass (``process_before_every_sampling``, hires fix included) the pass
module (:mod:`loratorio.host_forge_pass`) clones the UNet patcher and registers the
step (:mod:`loratorio.host_forge_step`); LoRA files come through Forge's own loader
(:mod:`loratorio.host_forge_lora`).

The built-in LoRA keeps off the composed tags: in ``after_extra_networks_activate`` it
is activated again with only the remaining tags (Forge merges lazily, when a patcher is
loaded, so nothing of the composed LoRAs was merged), "Lora hashes" keep every LoRA,
and the handled tags leave the extra-network data, which is part of the conditioning
cache key. "Merge into base" LoRAs stay with the built-in and apply to every branch.

Nothing here writes a weight: the routed forwards are removed when a branch call ends
(also on errors), and the text-encoder branches are routed the same way. An error in a
routed layer stops the generation through the WebUI's interrupt with the cause in the
console, the comments and the infotext; the next generation is unaffected.

File:line references are to Forge f2.0.1v1.10.1 (``dfdcbab6``).
"""

from __future__ import annotations

from .generation import GenerationState, get_state, usable
from .host_forge_backend import detect
from .host_forge_lora import ForgeBridge, is_forge
from .host_forge_pass import install_pass
from .host_forge_step import guarded, note, release_pass
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
from .routing import Router

__all__ = ["CACHE", "lora_names", "refresh_loras"]

CACHE = AdapterCache(CACHE_DEFAULT_MB)


def _shared():
    from modules import shared

    return shared


def _refusal(p) -> str | None:
    if getattr(p, "refiner_checkpoint_info", None) is not None:
        return Reason.REFINER
    model = getattr(p, "sd_model", None) or _shared().sd_model
    if not is_forge(model):
        return "the loaded model is not a Forge model"
    if getattr(model, "is_wan", False):
        return "video models (Wan) are not supported: LoRAtorio fuses image patches of 4-D latents"
    try:
        from backend.args import dynamic_args
    except ImportError:
        return None
    nunchaku = dynamic_args.get("nunchaku") if isinstance(dynamic_args, dict) else getattr(dynamic_args, "nunchaku",
                                                                                           None)
    if nunchaku:
        return ("Nunchaku (SVDQ) models apply LoRAs inside their own kernels, where no branch can run; "
                "load the model in another format to compose")
    return None


def process(p, *args) -> None:
    start_generation(p, args, _shared().opts, CACHE, guarded=guarded, refusal=_refusal)


def before_process_batch(p, *args, prompts=None, **kwargs) -> None:
    state = get_state(p)
    if not usable(state):
        return
    state.composer = None
    with guarded(p, "loading LoRAs"):
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
        note(state, f"patch size {state.settings.patch_size} is odd: patches do not line up with Flux's 2x2 tokens")


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
    if not usable(state) or not state.branches or extra_network_data is None:
        return
    with guarded(p, "keeping the built-in LoRA off the composed LoRAs"):
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
            if not detect().builtin_starts_clean:
                # the model holds every tag's LoRAs from the first activation: start the second from the unpatched
                p.sd_model.forge_objects = p.sd_model.forge_objects_original.shallow_copy()
            builtin.activate(p, list(keep))
            if hashes:
                p.lora_hashes = hashes
            if info is not None:
                p.extra_generation_params["Lora hashes"] = info
            set_lora_hashes(p, state, ForgeBridge(p.sd_model).networks(), _shared().opts)
        entries[:] = keep
        if not keep:
            del extra_network_data["lora"]


def process_batch(p, *args, **kwargs) -> None:
    state = get_state(p)
    if not usable(state) or not state.branches:
        return
    with guarded(p, "starting a batch"):
        state.new_composer()
        state.extra["pass_id"] = None


def process_before_every_sampling(p, *args, **kwargs) -> None:
    """Start of a sampling pass (twice around a hires pass): per-branch text conds and the step on a UNet clone."""
    state = get_state(p)
    if not usable(state) or not state.branches or state.composer is None:
        return
    with guarded(p, "preparing a sampling pass"):
        bridge = state.extra.get("bridge")
        if bridge is not None and ForgeBridge(p.sd_model).model_key() != state.extra.get("model_key"):
            note(state, "the model changed during the generation (hires checkpoint?); not applied after the change")
            release_pass(p, state)
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
    release_pass(p, state)
    with guarded(p, "finishing a batch"):
        state.record_map()
        state.count_dropped()
        _uncond_note(state)
        p.extra_generation_params.update(state.infotext())


def _uncond_note(state: GenerationState) -> None:
    missing = state.extra.get("steps_without_uncond", 0)
    if not missing:
        return
    total = state.extra.get("steps", 0)
    for old in [n for n in state.notes if n.startswith("re-centring not applied")]:
        state.notes.remove(old)
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
        release_pass(p, state)
        step = "writing the report"
        show_report(p, processed, state)
        if state.maps and state.error is None:
            step = "adding the composition map"
            append_maps(state, processed)
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
    return configured_defaults(_shared().opts)


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
        register_options(_shared())

    def on_before_ui():
        try:
            from modules import scripts

            register_xyz_axes(scripts.scripts_data)
        except Exception as exc:
            print(f"LoRAtorio: could not add the XYZ plot axes: {exc}")

    _on(cb.on_model_loaded, on_model_loaded, "loratorio_model_loaded")
    _on(cb.on_ui_settings, on_ui_settings, "loratorio_ui_settings")
    _on(cb.on_before_ui, on_before_ui, "loratorio_xyz")


postprocess_image = keep_image_for_map
