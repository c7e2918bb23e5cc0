"""User settings of one generation: parsing, validation, infotext and labels.

Host-free. The same :class:`Settings` fields are the keys of the API's dict form, the
names the core uses, and (in ``UI_ORDER``) the positional order of the script's UI
components, so every entry point validates through one function.

Script arguments (``Settings.from_args``) come in two forms:

- **positional**: the component values in ``UI_ORDER`` (what the UI sends; the WebUI API
  fills positions a request leaves out with the components' initial values);
- **named**: a single dict of settings as the first element, e.g.
  ``{"recenter": 0.3, "top_k": 2}``. Keys left out take the defaults (the server's
  configured defaults when the host passes them), except ``enabled``: a settings dict
  turns LoRAtorio on unless it says ``"enabled": false``. Elements after the dict are
  ignored (the WebUI API pads the argument list with the UI's initial values).

Wrong types, out-of-range values, unknown keys and too many positional values raise
:class:`SettingsError`; its message names the field, the value given and what is
allowed. Nothing is ever silently ignored or clamped.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .fusion import METHODS

__all__ = [
    "DEFAULT_METHOD",
    "FIELD_HELP",
    "INFOTEXT_KEYS",
    "LABELS",
    "UI_ORDER",
    "Settings",
    "SettingsError",
    "join_names",
    "split_names",
]


class SettingsError(ValueError):
    """A setting has a wrong type, is out of range, or is unknown."""


#: The composition method a new generation uses unless told otherwise (see docs/quality.md
#: for the evidence); ``paper`` is the published step exactly.
DEFAULT_METHOD = "joint"
#: What an infotext without a method entry was made with (versions before the setting).
_INFOTEXT_METHOD = "paper"


@dataclass
class Settings:
    """All LoRAtorio settings of one generation (method step numbers refer to ``docs/method.md``)."""

    enabled: bool = False
    recenter: float = 1.0  # lambda of step 8: the negative carries the LoRAs' own change
    temperature_scale: float = 10.0  # c of step 3
    patch_size: int = 2  # p of step 1
    top_k: int = 0  # step 5; 0 = all LoRAs take part
    probe_every: int = 1  # evaluate every candidate each N steps, only the top-k in between
    text_encoder_per_branch: bool = True
    pool: list[str] = field(default_factory=list)
    merge_into_base: list[str] = field(default_factory=list)
    composition_map: bool = False
    max_rows_per_call: int = 0  # 0 = all branch rows in one model call
    method: str = DEFAULT_METHOD  # a name in loratorio.fusion.METHODS

    # -- parsing ---------------------------------------------------------------------------

    @classmethod
    def from_args(cls, args: Sequence, defaults: Settings | None = None) -> Settings:
        """Parse script arguments (positional in ``UI_ORDER``, or a settings dict first).

        ``defaults`` supplies the values of keys a dict leaves out (default: the
        dataclass defaults). An empty argument list gives ``defaults`` unchanged.
        """
        base = defaults if defaults is not None else cls()
        if args is None:
            return base.copy()
        if isinstance(args, Mapping):
            return cls.from_dict(args, defaults=base)
        if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
            raise SettingsError(f"LoRAtorio arguments must be a list (positional values in the order "
                                f"{', '.join(UI_ORDER)}) or a settings dict, got {_show(args)}")
        args = list(args)
        if args and isinstance(args[0], Mapping):
            return cls.from_dict(args[0], defaults=base)
        if len(args) > len(UI_ORDER):
            raise SettingsError(f"LoRAtorio takes at most {len(UI_ORDER)} positional values "
                                f"({', '.join(UI_ORDER)}), got {len(args)}: {_show(args)}")
        values = dataclasses.asdict(base)
        for name, value in zip(UI_ORDER, args):
            values[name] = value
        return cls._validated(values)

    @classmethod
    def from_dict(cls, named: Mapping, defaults: Settings | None = None) -> Settings:
        """Parse the named form; a dict without ``enabled`` turns LoRAtorio on."""
        unknown = [k for k in named if k not in _FIELDS]
        if unknown:
            raise SettingsError(f"unknown LoRAtorio setting(s) {', '.join(repr(k) for k in unknown)}; "
                                f"allowed keys: {', '.join(UI_ORDER)}")
        values = dataclasses.asdict(defaults if defaults is not None else cls())
        values["enabled"] = True
        values.update(named)
        return cls._validated(values)

    @classmethod
    def _validated(cls, values: dict) -> Settings:
        out = {name: _CHECKS[name](name, values[name]) for name in UI_ORDER}
        both = [n for n in out["pool"] if n in out["merge_into_base"]]
        if both:
            raise SettingsError(f"LoRA {', '.join(repr(n) for n in both)} is both in pool and merge_into_base; "
                                "choose one: pool composes it as a branch, merge_into_base applies it to every branch")
        return cls(**out)

    def validate(self) -> Settings:
        """Re-check every field (after attributes were set directly, e.g. by an XYZ axis)."""
        return self._validated(dataclasses.asdict(self))

    def copy(self, **changes) -> Settings:
        return dataclasses.replace(self, pool=list(self.pool), merge_into_base=list(self.merge_into_base),
                                   **changes)

    def to_dict(self) -> dict:
        """The named form (JSON-ready), keys in ``UI_ORDER``."""
        return {name: (list(v) if isinstance(v, list) else v) for name, v in dataclasses.asdict(self).items()}

    def to_args(self) -> list:
        """The positional form in ``UI_ORDER``."""
        d = self.to_dict()
        return [d[name] for name in UI_ORDER]

    # -- infotext --------------------------------------------------------------------------

    def to_infotext(self) -> dict[str, str]:
        """The settings as infotext entries (``{}`` when disabled).

        Settings that change the image are always written; lists and display-only
        settings only when they differ from the default. The host adds the composed and
        skipped LoRA entries (``INFOTEXT_KEYS['loras']`` etc.) itself.
        """
        if not self.enabled:
            return {}
        d = {
            INFOTEXT_KEYS["enabled"]: "True",
            INFOTEXT_KEYS["method"]: self.method,
            INFOTEXT_KEYS["recenter"]: _num(self.recenter),
            INFOTEXT_KEYS["temperature_scale"]: _num(self.temperature_scale),
            INFOTEXT_KEYS["patch_size"]: str(self.patch_size),
            INFOTEXT_KEYS["top_k"]: str(self.top_k),
            INFOTEXT_KEYS["probe_every"]: str(self.probe_every),
            INFOTEXT_KEYS["text_encoder_per_branch"]: str(bool(self.text_encoder_per_branch)),
        }
        if self.pool:
            d[INFOTEXT_KEYS["pool"]] = join_names(self.pool)
        if self.merge_into_base:
            d[INFOTEXT_KEYS["merge_into_base"]] = join_names(self.merge_into_base)
        if self.composition_map:
            d[INFOTEXT_KEYS["composition_map"]] = "True"
        if self.max_rows_per_call:
            d[INFOTEXT_KEYS["max_rows_per_call"]] = str(self.max_rows_per_call)
        return d

    @staticmethod
    def from_infotext(params: Mapping) -> dict:
        """Settings found in parsed infotext (``{key: str}``), for paste-back.

        Returns ``{"enabled": False}`` when the infotext has no LoRAtorio entry (pasting
        a plain image's parameters turns the accordion off). With the entry, every
        setting is returned: keys missing from the text take the defaults (the text
        was written by a version that left them at their defaults). A value that does
        not parse is left out rather than failing the whole paste.
        """
        if not _truthy(params.get(INFOTEXT_KEYS["enabled"])):
            return {"enabled": False}
        out = Settings().to_dict()
        out["enabled"] = True
        out["method"] = _INFOTEXT_METHOD
        for name in UI_ORDER[1:]:
            raw = params.get(INFOTEXT_KEYS[name])
            if raw is None:
                continue
            try:
                out[name] = _CHECKS[name](name, _from_text(name, raw))
            except (SettingsError, ValueError):
                out.pop(name, None)
        return out


def _num(v: float) -> str:
    """Shortest text that parses back to the same float (``10.0`` -> ``"10"``)."""
    text = repr(float(v))
    return text.removesuffix(".0")


def _truthy(raw) -> bool:
    if isinstance(raw, bool):
        return raw
    return isinstance(raw, str) and raw.strip().lower() in ("true", "1", "yes", "on")


def _from_text(name: str, raw):
    kind = _KIND[name]
    if not isinstance(raw, str):
        return raw
    text = raw.strip()
    if kind is bool:
        if text.lower() in ("true", "false"):
            return text.lower() == "true"
        raise ValueError(text)
    if kind is int:
        return int(text)
    if kind is float:
        return float(text)
    if kind is str:
        return text
    return split_names(text)


def join_names(names: Sequence[str]) -> str:
    """LoRA names as one infotext value (``"a, b"``)."""
    return ", ".join(names)


def split_names(text: str) -> list[str]:
    """Inverse of :func:`join_names`."""
    return [n.strip() for n in text.split(",") if n.strip()]


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _type_name(value) -> str:
    return "None" if value is None else type(value).__name__


def _check_bool(name, value):
    if isinstance(value, bool):
        return value
    if type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_"):  # from a component
        return bool(value)
    raise SettingsError(f"LoRAtorio setting {name!r} must be true or false, got {_show(value)} "
                        f"({_type_name(value)})")


def _real(name, value, allowed: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise SettingsError(f"LoRAtorio setting {name!r} must be a number ({allowed}), got {_show(value)} "
                            f"({_type_name(value)})")
    v = float(value)
    if not math.isfinite(v):
        raise SettingsError(f"LoRAtorio setting {name!r} must be a finite number ({allowed}), got {_show(value)}")
    return v


def _check_int(minimum: int):
    allowed = f"a whole number >= {minimum}"

    def check(name, value):
        v = _real(name, value, allowed)
        if v != int(v):
            raise SettingsError(f"LoRAtorio setting {name!r} must be {allowed}, got {_show(value)}")
        if v < minimum:
            raise SettingsError(f"LoRAtorio setting {name!r} must be {allowed}, got {_show(value)}")
        return int(v)

    return check


def _check_recenter(name, value):
    v = _real(name, value, "0 to 1")
    if not 0.0 <= v <= 1.0:
        raise SettingsError(f"LoRAtorio setting {name!r} (re-centring lambda) must be between 0 and 1, "
                            f"got {_show(value)}")
    return v


def _check_positive(name, value):
    v = _real(name, value, "greater than 0")
    if v <= 0:
        raise SettingsError(f"LoRAtorio setting {name!r} must be greater than 0, got {_show(value)}")
    return v


def _check_names(name, value):
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise SettingsError(f"LoRAtorio setting {name!r} must be a list of LoRA names, got {_show(value)} "
                            f"({_type_name(value)})")
    out: list[str] = []
    for item in value:
        if not isinstance(item, str) or not item.strip():
            raise SettingsError(f"LoRAtorio setting {name!r} must hold non-empty LoRA names (strings), "
                                f"got {_show(item)} in {_show(value)}")
        if item.strip() not in out:
            out.append(item.strip())
    return out


def _check_method(name, value):
    if not isinstance(value, str) or value.strip().lower() not in METHODS:
        raise SettingsError(f"LoRAtorio setting {name!r} must be one of {', '.join(repr(m) for m in METHODS)}, "
                            f"got {_show(value)} ({_type_name(value)})")
    return value.strip().lower()


_FIELDS = tuple(f.name for f in dataclasses.fields(Settings))

UI_ORDER: tuple[str, ...] = (
    "enabled",
    "recenter",
    "temperature_scale",
    "patch_size",
    "top_k",
    "probe_every",
    "text_encoder_per_branch",
    "pool",
    "merge_into_base",
    "composition_map",
    "max_rows_per_call",
    "method",
)
assert set(UI_ORDER) == set(_FIELDS)

_CHECKS = {
    "enabled": _check_bool,
    "recenter": _check_recenter,
    "temperature_scale": _check_positive,
    "patch_size": _check_int(1),
    "top_k": _check_int(0),
    "probe_every": _check_int(1),
    "text_encoder_per_branch": _check_bool,
    "pool": _check_names,
    "merge_into_base": _check_names,
    "composition_map": _check_bool,
    "max_rows_per_call": _check_int(0),
    "method": _check_method,
}

_KIND = {
    "enabled": bool, "recenter": float, "temperature_scale": float, "patch_size": int, "top_k": int,
    "probe_every": int, "text_encoder_per_branch": bool, "pool": list, "merge_into_base": list,
    "composition_map": bool, "max_rows_per_call": int, "method": str,
}

LABELS: dict[str, str] = {
    "enabled": "LoRAtorio",
    "recenter": "Lambda (re-centring)",
    "temperature_scale": "Temperature scale",
    "patch_size": "Patch size",
    "top_k": "Top-k LoRAs per patch",
    "probe_every": "Probe every N steps",
    "text_encoder_per_branch": "Text encoder per branch",
    "pool": "Candidate pool",
    "merge_into_base": "Merge into base instead",
    "composition_map": "Show composition map",
    "max_rows_per_call": "Max rows per model call",
    # A new label with the joint default: the WebUI keeps every component's value in ui-config.json under
    # its label, and the "resolve" stored there by the version before would override the new default.
    "method": "Composition method",
}

FIELD_HELP: dict[str, str] = {
    "enabled": "Run every LoRA named in the prompt as its own branch and let each one act only where it "
               "knows the image best, instead of merging them all into the model.",
    "recenter": "How much the negative (unconditional) prediction follows the LoRAs. 0 = the base model's "
                "alone (cheapest: no negative pass per LoRA); 1 = the LoRAs' alone.",
    "temperature_scale": "How sharply each patch goes to the LoRA that differs most from the base model. "
                         "Higher = crisper hand-over between LoRAs, lower = softer blending.",
    "patch_size": "Size of the regions (in latent pixels, 8 image pixels each) that are given to one LoRA "
                  "or another. Smaller = finer detail in where each LoRA acts.",
    "top_k": "How many LoRAs may act in each patch. 0 lets all of them blend.",
    "probe_every": "Evaluate every candidate LoRA only every N steps, and only the top-k in between: "
                   "large candidate pools become much cheaper.",
    "text_encoder_per_branch": "Encode the prompt once per LoRA with that LoRA's text-encoder part, as it "
                               "was trained. Off: every branch uses the base prompt encoding.",
    "pool": "Further LoRAs that join the candidates without a tag in the prompt; with top-k they compete "
            "per patch and only the best ones act.",
    "merge_into_base": "LoRAs (named in the prompt) that are merged into the base model as usual and so "
                       "apply to every branch: good for global style or quality LoRAs.",
    "composition_map": "Add one image per result showing which LoRA acted where (averaged over the steps).",
    "max_rows_per_call": "Limit the batch rows of one extra model call to save VRAM (0 = all branches in "
                         "one call, fastest).",
    "method": "How the LoRAs' predictions are combined. 'paper' is the published LoRAtorio step (each patch "
              "shared among the LoRAs by SoftMin weights that sum to one); the other methods are described in "
              "the README.",
}

INFOTEXT_KEYS: dict[str, str] = {
    "enabled": "LoRAtorio",
    "recenter": "LoRAtorio lambda",
    "temperature_scale": "LoRAtorio temperature",
    "patch_size": "LoRAtorio patch",
    "top_k": "LoRAtorio top-k",
    "probe_every": "LoRAtorio probe every",
    "text_encoder_per_branch": "LoRAtorio TE per branch",
    "pool": "LoRAtorio pool",
    "merge_into_base": "LoRAtorio merged",
    "composition_map": "LoRAtorio map",
    "max_rows_per_call": "LoRAtorio max rows",
    "method": "LoRAtorio method",
    # written by the host from the generation's outcome, not settings:
    "loras": "LoRAtorio LoRAs",
    "skipped": "LoRAtorio skipped",
    "dropped": "LoRAtorio dropped steps",
    "note": "LoRAtorio note",
}
