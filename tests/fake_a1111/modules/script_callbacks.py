"""Fake ``modules.script_callbacks``: the callback lists and parameter objects LoRAtorio uses.

Every callback call is wrapped like the WebUI does: an exception is reported and the
next callback runs (it does not stop the generation).
"""

from __future__ import annotations

from . import errors

callbacks: dict[str, list] = {}


def clear_callbacks():
    callbacks.clear()


def _add(category, fn, name=None):
    callbacks.setdefault(category, []).append((fn, name))


def _run(category, *args):
    for fn, _ in list(callbacks.get(category, [])):
        try:
            fn(*args)
        except Exception:
            errors.report(f"Error executing callback {category}", exc_info=True)


class CFGDenoiserParams:
    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond,
                 denoiser=None):
        self.x, self.image_cond, self.sigma = x, image_cond, sigma
        self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
        self.text_cond, self.text_uncond, self.denoiser = text_cond, text_uncond, denoiser


class CFGDenoisedParams:
    def __init__(self, x, sampling_step, total_sampling_steps, inner_model):
        self.x, self.sampling_step, self.total_sampling_steps = x, sampling_step, total_sampling_steps
        self.inner_model = inner_model


class AfterCFGCallbackParams:
    def __init__(self, x, sampling_step, total_sampling_steps):
        self.x, self.sampling_step, self.total_sampling_steps = x, sampling_step, total_sampling_steps


def on_cfg_denoiser(callback, *, name=None):
    _add("cfg_denoiser", callback, name)


def on_cfg_denoised(callback, *, name=None):
    _add("cfg_denoised", callback, name)


def on_cfg_after_cfg(callback, *, name=None):
    _add("cfg_after_cfg", callback, name)


def on_model_loaded(callback, *, name=None):
    _add("model_loaded", callback, name)


def on_ui_settings(callback, *, name=None):
    _add("ui_settings", callback, name)


def on_before_ui(callback, *, name=None):
    _add("before_ui", callback, name)


def cfg_denoiser_callback(params):
    _run("cfg_denoiser", params)


def cfg_denoised_callback(params):
    _run("cfg_denoised", params)


def cfg_after_cfg_callback(params):
    _run("cfg_after_cfg", params)


def model_loaded_callback(sd_model):
    _run("model_loaded", sd_model)


def ui_settings_callback():
    _run("ui_settings")


def before_ui_callback():
    _run("before_ui")
