"""Fake of ``modules/script_callbacks.py`` (registration only; Forge never fires ``cfg_denoised``)."""

from __future__ import annotations

callbacks: dict[str, list] = {}


def _add(name, fn):
    callbacks.setdefault(name, []).append(fn)


def on_cfg_denoiser(fn, *a, **k):
    _add("cfg_denoiser", fn)


def on_cfg_denoised(fn, *a, **k):
    _add("cfg_denoised", fn)


def on_cfg_after_cfg(fn, *a, **k):
    _add("cfg_after_cfg", fn)


def on_model_loaded(fn, *a, **k):
    _add("model_loaded", fn)


def on_ui_settings(fn, *a, **k):
    _add("ui_settings", fn)


def on_infotext_pasted(fn, *a, **k):
    _add("infotext_pasted", fn)


def on_before_ui(fn, *a, **k):
    _add("before_ui", fn)


def on_script_unloaded(fn, *a, **k):
    _add("script_unloaded", fn)


def remove_current_script_callbacks():
    pass
