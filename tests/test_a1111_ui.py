"""The accordion, its element ids and labels, the API defaults it implies, paste-back and settings."""

from __future__ import annotations

import importlib
import sys

import pytest

from loratorio import host_common
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
    assert host_common.CACHE_OPTION in opts.data_labels
    opts.loratorio_default_recenter = 0.2
    opts.loratorio_default_top_k = 2
    components = script.ui(False)
    values = dict(zip(UI_ORDER, [c.value for c in components], strict=True))
    assert values["recenter"] == 0.2 and values["top_k"] == 2 and values["enabled"] is False
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
    assert fields[id(components[UI_ORDER.index("recenter")])] == INFOTEXT_KEYS["recenter"]
    assert fields[id(components[UI_ORDER.index("pool")])](pasted) == ["a", "b"]
    assert fields[id(components[UI_ORDER.index("pool")])]({"Steps": "20"}) is None
    assert INFOTEXT_KEYS["recenter"] in script.paste_field_names
