"""The accordion, its element ids and labels, the API defaults it implies, paste-back and settings."""

from __future__ import annotations

import importlib
import sys

import pytest

from loratorio import host_options, host_ui
from loratorio.settings import INFOTEXT_KEYS, LABELS, UI_ORDER, Settings
from tests import fake_a1111 as fa
from tests.fake_a1111.model import TinySD


@pytest.fixture
def fake(monkeypatch, tmp_path):
    ns = fa.install(monkeypatch, model=TinySD(), lora_dir=tmp_path)
    gradio = importlib.import_module("tests.fake_a1111.gradio")
    gradio.created.clear()
    monkeypatch.setitem(sys.modules, "gradio", gradio)
    for name in ("ui_components", "ui_common"):
        mod = importlib.import_module(f"tests.fake_a1111.modules.{name}")
        monkeypatch.setitem(sys.modules, f"modules.{name}", mod)
        monkeypatch.setattr(ns.modules, name, mod, raising=False)
    ns.gradio = gradio
    return ns


@pytest.mark.parametrize("tab", ["txt2img", "img2img"])
def test_ui_ids_labels_and_api_defaults(fake, tab):
    script, _ = fa.load_script(fake)
    components = script.ui(tab == "img2img")
    assert len(components) == len(UI_ORDER)
    assert components[0].elem_id == f"loratorio_{tab}"
    assert [c.elem_id for c in components[1:]] == [f"loratorio_{tab}_{name}" for name in UI_ORDER[1:]]
    assert [c.label for c in components] == [LABELS[name] for name in UI_ORDER]
    # the API fills missing arguments with these initial values: they must parse, and mean "off"
    parsed = Settings.from_args([c.value for c in components])
    assert parsed == Settings()
    assert script.title() == "LoRAtorio"


def test_ui_takes_defaults_from_the_settings_page(fake):
    script, _ = fa.load_script(fake)
    fake.script_callbacks.ui_settings_callback()
    opts = fake.shared.opts
    assert host_options.CACHE_OPTION in opts.data_labels
    opts.loratorio_default_recenter = 0.5  # stored by a version before the methods: no longer read
    components = script.ui(False)
    assert components[UI_ORDER.index("recenter")].value == Settings().recenter
    opts.loratorio_default_lambda = 0.2
    opts.loratorio_default_top_k = 2
    opts.loratorio_default_composition_method = "paper"
    components = script.ui(False)
    values = dict(zip(UI_ORDER, [c.value for c in components], strict=True))
    assert values["recenter"] == 0.2 and values["top_k"] == 2 and values["enabled"] is False
    assert values["method"] == "paper"
    # an invalid stored value falls back to the built-in defaults instead of breaking the UI
    opts.loratorio_default_patch_size = -3
    components = script.ui(False)
    assert components[UI_ORDER.index("patch_size")].value == 2


def test_paste_fields(fake):
    script, _ = fa.load_script(fake)
    components = script.ui(False)
    fields = dict((id(c), key) for c, key in script.infotext_fields)
    enabled_key = fields[id(components[0])]
    pasted = {**Settings(enabled=True, recenter=0.3, pool=["a", "b"]).to_infotext()}
    assert enabled_key(pasted) is True
    assert enabled_key({"Steps": "20"}) is False
    assert fields[id(components[UI_ORDER.index("recenter")])](pasted) == 0.3
    assert fields[id(components[UI_ORDER.index("pool")])](pasted) == ["a", "b"]
    assert fields[id(components[UI_ORDER.index("pool")])]({"Steps": "20"}) is None
    assert INFOTEXT_KEYS["recenter"] in script.paste_field_names
    # settings at their defaults are not in the text: pasting resets them, it does not keep the UI's value
    get = {name: fields[id(components[UI_ORDER.index(name)])] for name in UI_ORDER}
    assert get["composition_map"](pasted) is False and get["max_rows_per_call"](pasted) == 0
    assert get["method"](pasted) == Settings().method
    assert get["method"]({"LoRAtorio": "True", "LoRAtorio lambda": "0.5"}) == "paper"  # made before the setting
    assert all(get[name]({"Steps": "20"}) is None for name in UI_ORDER[1:])  # a plain image: only switched off


def _known_names(html: str) -> list[str]:
    """The LoRA names the page script reads from the hidden element's data attribute."""
    import html as html_lib
    import json
    import re

    match = re.fullmatch(rf'<div {host_ui.KNOWN_LORAS_ATTR}="([^"]*)"></div>', html)
    assert match, html
    return json.loads(html_lib.unescape(match.group(1)))


def test_the_page_gets_every_name_a_tag_can_use(fake, tmp_path):
    """The header summary marks tags the LoRA list does not know, so the page needs the names and aliases."""
    from tests.lora_files import write_lora

    for name in ("style", "char"):
        write_lora(tmp_path / f"{name}.safetensors", {"lora_unet_x": (4, 4)})
    fake.networks.list_available_networks()
    nets = fake.networks
    nets.available_network_aliases["style_alias"] = nets.available_networks["style"]
    nets.available_network_aliases["shared"] = nets.available_networks["char"]
    nets.forbidden_network_aliases["shared"] = 1  # two files claim this alias: a tag cannot use it
    script, _ = fa.load_script(fake)
    script.ui(False)
    known = next(c for c in fake.gradio.created if getattr(c, "elem_id", None) == "loratorio_txt2img_known_loras")
    assert isinstance(known, fake.gradio.HTML)
    assert _known_names(known.value) == ["char", "style", "style_alias"]

    # the refresh button next to the LoRA lists updates the names as well
    write_lora(tmp_path / "new.safetensors", {"lora_unet_x": (4, 4)})
    button = next(c for c in fake.gradio.created if getattr(c, "elem_id", None) == "loratorio_txt2img_refresh")
    assert len(button.clicks) == 1
    fn, _inputs, outputs = button.clicks[0]
    pool, merge = (next(c for c in fake.gradio.created if getattr(c, "elem_id", None) == f"loratorio_txt2img_{n}")
                   for n in ("pool", "merge_into_base"))
    assert outputs == [pool, merge, known]
    pool_update, merge_update, html = fn()
    assert pool_update["choices"] == merge_update["choices"] == ["char", "new", "style"]
    assert _known_names(html) == ["char", "new", "style"]
    assert known.value == html and pool.choices == ["char", "new", "style"]  # for pages loaded later


def test_names_with_quotes_survive_the_html_attribute():
    html = host_ui.known_loras_html(['a"b', "c'd", "<e>&"])
    assert _known_names(html) == ['a"b', "c'd", "<e>&"]


def test_controls_are_laid_out_two_per_row_with_short_labels(fake):
    """Two controls per row and labels short enough for one line keep each row's sliders in line."""
    script, _ = fa.load_script(fake)
    components = dict(zip(UI_ORDER, script.ui(False), strict=True))
    accordion = components["enabled"]
    rows = [c for c in accordion.children if isinstance(c, fake.gradio.Row)]
    assert rows, "the accordion has no rows"
    for row in rows:
        controls = [c for c in row.children if c.label is not None]
        assert 1 <= len(controls) <= 2, [c.label for c in controls]
        assert len({type(c) for c in controls}) == 1, [c.label for c in controls]  # no number box among sliders
        for c in controls:
            assert len(c.label) <= 24 and "(0 =" not in c.label, c.label
    numeric = [name for name, value in Settings().to_dict().items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)]
    assert all(isinstance(components[name], fake.gradio.Slider) for name in numeric), numeric
    assert components["max_rows_per_call"].minimum == 0


def test_settings_page_says_what_zero_means(fake):
    fa.load_script(fake)
    fake.script_callbacks.ui_settings_callback()
    labels = fake.shared.opts.data_labels
    top_k = labels[host_options.OPTION_KEYS["top_k"]]
    max_rows = labels[host_options.OPTION_KEYS["max_rows_per_call"]]
    assert top_k.label == "Default " + LABELS["top_k"] and max_rows.label == "Default " + LABELS["max_rows_per_call"]
    assert "0 = all" in top_k.comment_after and "0 = no limit" in max_rows.comment_after
    assert max_rows.component is fake.gradio.Slider
    assert max_rows.component_args == {"minimum": 0, "maximum": 64, "step": 1}
