"""The WebUI pieces a user sees: the accordion, its paste-back, and the settings page section.

gradio and the host's ``modules`` are imported inside the functions, when the WebUI
builds its UI. Both hosts build the same controls from ``UI_ORDER`` and the ranges here.
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Mapping, Sequence

from .fusion import METHODS
from .host_options import CACHE_DEFAULT_MB, CACHE_OPTION, OPTION_KEYS
from .settings import INFOTEXT_KEYS, LABELS, UI_ORDER, Settings

__all__ = ["KNOWN_LORAS_ATTR", "SLIDER_RANGES", "UI_ROWS", "build_ui", "known_loras_html", "paste_fields",
           "register_options", "tag_names"]

# minimum, maximum, step of each slider, in the accordion and on the settings page
SLIDER_RANGES: dict[str, tuple[float, float, float]] = {
    "recenter": (0.0, 1.0, 0.05),
    "temperature_scale": (0.5, 100.0, 0.5),
    "patch_size": (1, 16, 1),
    "top_k": (0, 16, 1),
    "probe_every": (1, 20, 1),
    "max_rows_per_call": (0, 64, 1),
}
# What a 0 means, where the label has no room for it (the settings page shows it under the label).
ZERO_MEANS = {"top_k": "0 = all LoRAs share every patch", "max_rows_per_call": "0 = no limit (all rows in one call)"}
LORA_LISTS = ("pool", "merge_into_base")  # multiselect dropdowns of LoRA names, with a refresh button
SWITCHES = ("text_encoder_per_branch", "composition_map")
# The accordion's rows, one kind of control each. Two per row keep every label on one line
# in the WebUI's default column width, so the controls of a row line up.
UI_ROWS = (
    ("method",),
    ("recenter", "temperature_scale"),
    ("patch_size", "top_k"),
    ("probe_every", "max_rows_per_call"),
    LORA_LISTS,
    SWITCHES,
)


def register_options(shared) -> None:
    """The "LoRAtorio" section of the WebUI settings: defaults of the UI and the cache bound."""
    import gradio as gr

    section = ("loratorio", "LoRAtorio")
    d = Settings()

    def add(key, default, label, component, args=None, info=None):
        option = shared.OptionInfo(default, label, component, args or {}, section=section)
        if info and hasattr(option, "info"):
            option = option.info(info)
        shared.opts.add_option(key, option)

    add(CACHE_OPTION, CACHE_DEFAULT_MB, "LoRA weight cache (MB)", gr.Number, {"precision": 0, "minimum": 0},
        "LoRAs loaded for composition stay in memory across generations up to this size; 0 = load every time")
    for name, (minimum, maximum, step) in SLIDER_RANGES.items():
        add(OPTION_KEYS[name], getattr(d, name), "Default " + LABELS[name], gr.Slider,
            {"minimum": minimum, "maximum": maximum, "step": step}, ZERO_MEANS.get(name))
    for name in SWITCHES:
        add(OPTION_KEYS[name], getattr(d, name), "Default " + LABELS[name], gr.Checkbox)
    add(OPTION_KEYS["method"], d.method, "Default " + LABELS["method"], gr.Radio, {"choices": list(METHODS)},
        "paper = the published LoRAtorio step exactly; the README compares the methods")


KNOWN_LORAS_ATTR = "data-loratorio-loras"


def tag_names(lora_names: Callable[[], list[str]]) -> list[str]:
    """Every name a ``<lora:...>`` tag can use: the LoRA list plus the aliases the built-in LoRA accepts.

    Both WebUIs' built-in LoRA module is importable as ``networks``; an alias another file
    also uses is "forbidden" there and resolves by file name only.
    """
    try:
        names = set(lora_names())
    except Exception:  # a broken LoRA folder must not take the UI down
        names = set()
    try:
        import networks

        forbidden = getattr(networks, "forbidden_network_aliases", {})
        names.update(a for a in networks.available_network_aliases if a.lower() not in forbidden)
    except Exception:
        pass
    return sorted(names)


def known_loras_html(names: Sequence[str]) -> str:
    """The hidden element the page script reads the known LoRA names from (to mark unknown tags)."""
    return f'<div {KNOWN_LORAS_ATTR}="{html.escape(json.dumps(list(names)), quote=True)}"></div>'


def build_ui(script, is_img2img: bool, defaults: Settings, lora_names: Callable[[], list[str]],
             refresh: Callable[[], None] | None = None) -> list:
    """The accordion and its components, in ``UI_ORDER``; also sets the script's paste fields.

    Element ids: ``loratorio_<tab>`` for the accordion, ``loratorio_<tab>_<field>`` for
    each component (tab = txt2img / img2img), ``loratorio_<tab>_known_loras`` for the
    hidden list of LoRA names the header summary checks tags against. Free of side
    effects beyond the script's own attributes (the API calls ``ui()`` to read the defaults).
    """
    import gradio as gr
    from modules.ui_components import InputAccordion

    tab = "img2img" if is_img2img else "txt2img"

    def eid(name: str) -> str:
        return f"loratorio_{tab}_{name}"

    def control(name: str):
        """The component of one setting, by its kind."""
        label, elem_id = LABELS[name], eid(name)
        if name in SLIDER_RANGES:
            minimum, maximum, step = SLIDER_RANGES[name]
            return gr.Slider(minimum, maximum, value=getattr(defaults, name), step=step, label=label, elem_id=elem_id)
        if name in LORA_LISTS:
            return gr.Dropdown(choices=names, value=[], multiselect=True, label=label, elem_id=elem_id)
        if name == "method":
            return gr.Radio(choices=list(METHODS), value=defaults.method, label=label, elem_id=elem_id)
        return gr.Checkbox(value=getattr(defaults, name), label=label, elem_id=elem_id)

    try:
        names = list(lora_names())
    except Exception:  # a broken LoRA folder must not take the UI down
        names = []
    components: dict = {}
    with InputAccordion(False, label=LABELS["enabled"], elem_id=f"loratorio_{tab}") as enabled:
        components["enabled"] = enabled
        known = gr.HTML(value=known_loras_html(tag_names(lora_names)), elem_id=eid("known_loras"),
                        elem_classes=["loratorio-known-loras"])
        for row in UI_ROWS:
            with gr.Row():
                components.update({name: control(name) for name in row})
                if row == LORA_LISTS:
                    _add_refresh_button([components[n] for n in row], known, refresh, lora_names, eid("refresh"))

    script.infotext_fields = paste_fields(components)
    script.paste_field_names = [INFOTEXT_KEYS[n] for n in UI_ORDER if n not in ("enabled", "pool", "merge_into_base")]
    return [components[name] for name in UI_ORDER]


def _add_refresh_button(dropdowns: list, known, refresh: Callable[[], None] | None,
                        lora_names: Callable[[], list[str]], elem_id: str) -> None:
    """The WebUI's refresh button for the LoRA lists: one rescan updates both dropdowns and the known names.

    Built as the WebUI's ``create_refresh_button`` builds its own, with the hidden list of
    known names as one more output (a second listener on that button could read the old
    list while the rescan is still running). Skipped without ``refresh`` or on a WebUI
    without these helpers: the dropdowns still work, just without refresh.
    """
    if refresh is None:
        return
    try:
        import gradio as gr
        from modules.ui_common import refresh_symbol
        from modules.ui_components import ToolButton
    except Exception:
        return

    def refreshed():
        refresh()
        choices = list(lora_names())
        known.value = known_loras_html(tag_names(lora_names))
        for dropdown in dropdowns:  # later page loads start from the new lists too
            dropdown.choices = choices
        return [*(gr.update(choices=choices) for _ in dropdowns), known.value]

    button = ToolButton(value=refresh_symbol, elem_id=elem_id, tooltip="Refresh the LoRA lists")
    button.click(fn=refreshed, inputs=[], outputs=[*dropdowns, known])


def paste_fields(components: Mapping) -> list[tuple]:
    """``(component, callable)`` pairs for pasting infotext back into the UI.

    The accordion turns off when the pasted text has no LoRAtorio entry. With the entry,
    every setting is set: the infotext leaves out settings at their defaults (and images
    from before the method setting were made by the paper's step), so a key the text
    does not have must reset the component rather than leave the current value.
    """
    fields: list[tuple] = [(components["enabled"], lambda d: Settings.from_infotext(d)["enabled"])]
    fields += [(components[name], _setting_getter(name)) for name in UI_ORDER[1:]]
    return fields


def _setting_getter(name: str):
    def get(params):
        if INFOTEXT_KEYS["enabled"] not in params:
            return None
        return Settings.from_infotext(params).get(name)

    return get
