"""Lifecycle steps both WebUI adapters share: starting a generation, refusing or stopping
it, and what the user reads afterwards (the report under the images, Lora hashes, maps).

The host's ``modules`` (errors, shared) are imported inside the functions that need them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

from .generation import STATE_ATTR, GenerationState, get_state
from .host_options import cache_limit_mb, settings_for
from .loading import AdapterCache
from .settings import INFOTEXT_KEYS, SettingsError

__all__ = ["append_maps", "comment", "guarded_by", "keep_image_for_map", "refusal_text", "refuse_job",
           "report_after_images", "set_lora_hashes", "show_report", "show_under_images", "start_generation",
           "stop_generation"]

def refusal_text(message: str) -> str:
    """A refused job's console and UI line: the message with one ``LoRAtorio:`` prefix where it names none."""
    return message if message.startswith("LoRAtorio") else f"LoRAtorio: {message}"


def _report_error(text: str) -> None:
    """``text`` with the current exception's traceback in the WebUI's error log (the console without it)."""
    try:
        from modules import errors

        errors.report(text, exc_info=True)
    except Exception:
        print(text)


def _interrupt_job() -> None:
    """Stop the WebUI job: a script hook's exception does not stop a generation by itself,
    so the sampler is told to stop at its next model call."""
    from modules import shared

    shared.state.interrupt()


def refuse_job(p, message: str) -> None:
    """Invalid settings: no image is made; the reason goes to the console, the comments and the infotext."""
    text = refusal_text(message)
    print(text)
    comment(p, text)
    p.extra_generation_params[INFOTEXT_KEYS["note"]] = f"refused: {message}"
    _interrupt_job()


def stop_generation(p, state: GenerationState | None, exc: BaseException, where: str,
                    release: Callable[[object, GenerationState], None] | None = None) -> None:
    """An error inside a host adapter's hooks: stop the generation cleanly and say why.

    Routing is already off (every router leaves on exit). ``release`` undoes what the host
    attached for the current sampling pass before the state is closed.
    """
    text = f"LoRAtorio stopped the generation ({where}): {type(exc).__name__}: {exc}"
    _report_error(text)
    if state is not None:
        state.error = exc
        if release is not None:
            release(p, state)
        p.extra_generation_params.update(state.infotext())
        state.close()
    comment(p, text)
    _interrupt_job()


@contextlib.contextmanager
def guarded_by(fail: Callable, p, where: str):
    """Run a hook's work; an exception goes to ``fail(p, state, exc, where)``, the host adapter's way of
    stopping the generation (see :func:`stop_generation`)."""
    try:
        yield
    except Exception as exc:
        fail(p, get_state(p), exc, where)


def report_after_images(p, processed, exc: BaseException, step: str) -> str:
    """Report an error of the last hook (``postprocess``), when the images are already made.

    The generation is not stopped (nothing is left to stop) and its images are kept; the
    error goes to the console with its traceback, under the images (:func:`show_under_images`)
    and into the infotext note of later reads of ``p.extra_generation_params``. Returns the
    message.
    """
    text = f"LoRAtorio: {step} failed after the images were made: {type(exc).__name__}: {exc}"
    _report_error(text)
    show_under_images(p, processed, text)
    params = getattr(p, "extra_generation_params", None)
    if isinstance(params, dict):
        note = INFOTEXT_KEYS["note"]
        params[note] = "; ".join(filter(None, [params.get(note), f"{step} failed: {exc}"]))
    return text


def comment(p, text: str) -> None:
    """Add ``text`` to the processing object's comments, which the UI shows under the images.

    Only from a hook that runs before the WebUI builds its result (``process`` up to
    ``postprocess_batch``); from ``postprocess`` use :func:`show_under_images`.
    """
    fn = getattr(p, "comment", None)
    if callable(fn):
        fn(text)


def show_under_images(p, processed, text: str) -> None:
    """Show ``text`` under the images from ``postprocess``, once.

    The WebUI copies ``p.comments`` into the result's ``comments`` string (what the UI
    shows) when it builds the result, and runs the scripts' ``postprocess`` only after
    that (A1111 1.6-1.10 ``processing.py``: ``Processed.__init__`` :525, built at :1137,
    ``postprocess`` at :1148; Forge the same at :528, :1144, :1156). So a line written
    here goes into the result itself; ``p.comments`` gets it too, for code that reads it.
    """
    comment(p, text)
    shown = getattr(processed, "comments", None)
    if not isinstance(shown, str) or text in shown.splitlines():
        return
    if shown and not shown.endswith("\n"):
        shown += "\n"
    processed.comments = f"{shown}{text}\n"


def show_report(p, processed, state: GenerationState) -> None:
    """``postprocess``: the generation's report (composed, skipped, dropped, notes) under the images.

    Not for a generation LoRAtorio refused or stopped: that line was shown when it
    happened, and the infotext has the rest.
    """
    if state.refused is not None or state.error is not None:
        return
    report = state.report()
    if report:
        show_under_images(p, processed, report)


def _hash_key(name: str) -> str:
    """A LoRA's name as the built-in writes it in "Lora hashes" (no ``:`` or ``,``)."""
    return name.replace(":", "").replace(",", "")


def _hashes_of(p) -> dict[str, str]:
    """The built-in's LoRA hashes of ``p``: its ``lora_hashes``, or where a WebUI keeps none (Forge Classic),
    read back from the "Lora hashes" infotext value it wrote."""
    hashes = getattr(p, "lora_hashes", None)
    if isinstance(hashes, dict):
        return dict(hashes)
    out = {}
    for part in str(p.extra_generation_params.get("Lora hashes") or "").split(","):
        name, sep, value = part.rpartition(":")
        if sep and name.strip():
            out[name.strip()] = value.strip()
    return out


def set_lora_hashes(p, state: GenerationState, nets, opts) -> None:
    """Make "Lora hashes" list exactly the LoRAs that act in this generation, as the built-in writes them.

    The built-in hashes every tag it could load, before the host adapter takes the
    composed tags away. That list loses the tags LoRAtorio skipped (they act nowhere) and
    gains the pool LoRAs plus any composed tag the built-in left out (Forge's built-in
    stops at the first file it cannot load). ``nets`` is the host's LoRA module, with
    ``available_network_aliases`` / ``available_networks`` entries that have
    ``read_hash()`` and ``shorthash``.
    """
    if not getattr(opts, "lora_add_hashes_to_infotext", True):
        return
    hashes = _hashes_of(p)
    before = dict(hashes)
    acting = {_hash_key(b.name) for b in state.branches}
    for name in state.skipped:
        key = _hash_key(name)
        if key not in acting:
            hashes.pop(key, None)
    for branch in state.branches:
        key = _hash_key(branch.name)
        entry = nets.available_network_aliases.get(branch.name) or nets.available_networks.get(branch.name)
        if key in hashes or entry is None:
            continue
        entry.read_hash()
        if entry.shorthash:
            hashes[key] = entry.shorthash
    if hashes == before:
        return
    p.lora_hashes = hashes
    if hashes:
        p.extra_generation_params["Lora hashes"] = ", ".join(f"{k}: {v}" for k, v in hashes.items())
    else:
        p.extra_generation_params.pop("Lora hashes", None)


def start_generation(p, args: Sequence, opts, cache: AdapterCache, *, guarded: Callable,
                     refusal: Callable[[object], str | None]) -> GenerationState | None:
    """The ``process`` hook of both hosts: read the settings and put a fresh state on ``p``.

    Settings that do not validate refuse the whole job (:func:`refuse_job`).
    A job LoRAtorio cannot serve (``refusal`` gives the reason) goes on without it, with a
    note. Errors inside are handled by the host's ``guarded(p, where)`` context manager.
    Returns the state, or None when LoRAtorio is off or the job was refused.
    """
    setattr(p, STATE_ATTR, None)
    try:
        settings = settings_for(p, args, opts)
    except SettingsError as exc:
        refuse_job(p, str(exc))
        return None
    if not settings.enabled:
        return None
    state = GenerationState(settings)
    setattr(p, STATE_ATTR, state)
    with guarded(p, "process"):
        cache.set_limit(cache_limit_mb(opts))
        reason = refusal(p)
        if reason:
            state.refuse(reason)
            comment(p, f"LoRAtorio: {reason}; generating without it")
        p.extra_generation_params.update(state.infotext())
    return state


def keep_image_for_map(p, pp, *script_args) -> None:
    """``postprocess_image``: remember each finished image the composition map is drawn over."""
    state = get_state(p)
    if state is not None and state.settings.composition_map and state.composer is not None:
        state.extra.setdefault("images", []).append(pp.image)


def append_maps(state: GenerationState, processed) -> None:
    """Add one composition map per generated image after the images, with the image's infotext."""
    from .compmap import render_map

    images = state.extra.get("images") or []
    first = getattr(processed, "index_of_first_image", 0)
    infotexts = getattr(processed, "infotexts", None)
    for i, (weights, names) in enumerate(state.maps):
        if i < len(images):
            base = images[i]
        elif first + i < len(processed.images):
            base = processed.images[first + i]
        else:
            break
        processed.images.append(render_map(base, weights, names))
        if infotexts is not None and len(infotexts) > first + i:
            infotexts.append(infotexts[first + i])
