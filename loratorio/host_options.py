"""Where a generation's settings come from in the WebUI: the settings page, the script's
arguments and XYZ-plot overrides.

The settings page gives the defaults (``OPTION_KEYS``), the script arguments (UI or API)
override them, and an XYZ axis (``register_xyz_axes``) overrides those for its cells
through an attribute on the processing object. The host's ``modules`` are only touched
through the ``opts`` and ``scripts_data`` objects passed in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .fusion import METHODS
from .settings import LABELS, Settings, SettingsError

__all__ = ["CACHE_DEFAULT_MB", "CACHE_OPTION", "OPTION_KEYS", "OVERRIDES_ATTR", "XYZ_PREFIX", "cache_limit_mb",
           "configured_defaults", "register_xyz_axes", "settings_for"]

CACHE_OPTION = "loratorio_cache_mb"
CACHE_DEFAULT_MB = 1024
OPTION_KEYS: dict[str, str] = {
    name: f"loratorio_default_{name}"
    for name in ("temperature_scale", "patch_size", "top_k", "probe_every",
                 "text_encoder_per_branch", "composition_map", "max_rows_per_call", "method")
}
# A new key for lambda: the WebUI keeps every applied setting, and the 0.5 stored by versions
# before the methods would give the default method a negative that lets guidance burn images.
OPTION_KEYS["recenter"] = "loratorio_default_lambda"
# A new key for the method with the joint default, for the same reason ("resolve" stored before).
OPTION_KEYS["method"] = "loratorio_default_composition_method"
XYZ_PREFIX = "[LoRAtorio] "
OVERRIDES_ATTR = "loratorio_overrides"  # set on the processing object by XYZ axes


def configured_defaults(opts) -> Settings:
    """The defaults from the WebUI's settings page (built-in defaults where unset or invalid)."""
    values = Settings().to_dict()
    for name, key in OPTION_KEYS.items():
        try:
            value = getattr(opts, key)
        except AttributeError:
            continue
        if value is not None:
            values[name] = value
    try:
        return Settings(**values).validate()
    except (SettingsError, TypeError):
        return Settings()


def cache_limit_mb(opts) -> float:
    try:
        value = float(getattr(opts, CACHE_OPTION))
    except (AttributeError, TypeError, ValueError):
        return float(CACHE_DEFAULT_MB)
    return max(0.0, value) if math.isfinite(value) else float(CACHE_DEFAULT_MB)


def settings_for(p, args: Sequence, opts) -> Settings:
    """Settings of a generation: script arguments, then any XYZ-axis overrides on ``p``.

    Raises :class:`SettingsError` for invalid values from either source.
    """
    settings = Settings.from_args(args, defaults=configured_defaults(opts))
    overrides = getattr(p, OVERRIDES_ATTR, None)
    if overrides:
        settings = Settings.from_dict({**settings.to_dict(), **overrides})
    return settings


def register_xyz_axes(scripts_data) -> bool:
    """Add the LoRAtorio axes to the XYZ plot script (idempotent). False when XYZ is not loaded."""
    module = next((d.module for d in scripts_data if getattr(d.script_class, "__module__", "") == "xyz_grid.py"), None)
    if module is None:
        return False
    if any(getattr(o, "label", "").startswith(XYZ_PREFIX) for o in module.axis_options):
        return True

    def setter(name: str, convert):
        def apply(p, x, xs):
            overrides = dict(getattr(p, OVERRIDES_ATTR, None) or {})
            overrides[name] = convert(x)
            setattr(p, OVERRIDES_ATTR, overrides)

        return apply

    def to_bool(x):
        return x if isinstance(x, bool) else str(x).strip().lower() == "true"

    choice = module.boolean_choice(reverse=True) if hasattr(module, "boolean_choice") else None
    module.axis_options.extend([
        module.AxisOption(XYZ_PREFIX + "Enabled", str, setter("enabled", to_bool), choices=choice),
        module.AxisOption(XYZ_PREFIX + LABELS["recenter"], float, setter("recenter", float)),
        module.AxisOption(XYZ_PREFIX + LABELS["temperature_scale"], float, setter("temperature_scale", float)),
        module.AxisOption(XYZ_PREFIX + LABELS["patch_size"], int, setter("patch_size", int)),
        module.AxisOption(XYZ_PREFIX + "Top-k", int, setter("top_k", int)),
        module.AxisOption(XYZ_PREFIX + LABELS["method"], str, setter("method", str), choices=lambda: list(METHODS)),
    ])
    return True
