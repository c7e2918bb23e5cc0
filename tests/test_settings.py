"""Settings: both argument forms, every error message names field and value, infotext round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest

from loratorio.fusion import METHODS
from loratorio.settings import DEFAULT_METHOD, INFOTEXT_KEYS, LABELS, UI_ORDER, Settings, SettingsError


def test_defaults_and_order():
    s = Settings()
    assert UI_ORDER == ("enabled", "recenter", "temperature_scale", "patch_size", "top_k", "probe_every",
                        "text_encoder_per_branch", "pool", "merge_into_base", "composition_map", "max_rows_per_call",
                        "method")
    assert s.to_args() == [False, 1.0, 10.0, 2, 0, 1, True, [], [], False, 0, DEFAULT_METHOD]
    assert DEFAULT_METHOD in METHODS and "paper" in METHODS
    assert Settings.from_args([]) == s
    assert Settings.from_args(s.to_args()) == s
    assert set(LABELS) == set(UI_ORDER)


def test_positional_form_accepts_ui_values():
    # gradio sliders give floats for whole numbers; numpy scalars may come from components
    s = Settings.from_args([True, 0.3, 12, 4.0, np.int64(2), 3, np.bool_(False), ("a", "b"), None, True, 8.0,
                            "Paper"])
    assert s == Settings(True, 0.3, 12.0, 4, 2, 3, False, ["a", "b"], [], True, 8, "paper")
    assert isinstance(s.patch_size, int) and isinstance(s.temperature_scale, float)
    assert isinstance(s.text_encoder_per_branch, bool)


def test_partial_positional_keeps_defaults():
    assert Settings.from_args([True, 0.0]) == Settings(enabled=True, recenter=0.0)


def test_dict_form():
    s = Settings.from_args([{"recenter": 0.2, "pool": ["x"]}])
    assert s.enabled and s.recenter == 0.2 and s.pool == ["x"] and s.patch_size == 2
    assert not Settings.from_args([{"enabled": False}]).enabled
    # elements after the dict are the API's padding with the UI's initial values: ignored
    assert Settings.from_args([{"top_k": 3}, 0.9, 1.0]).recenter == Settings().recenter
    # missing keys take the configured defaults when given
    configured = Settings(recenter=0.1, patch_size=4)
    s = Settings.from_args([{"top_k": 1}], defaults=configured)
    assert (s.recenter, s.patch_size, s.top_k, s.enabled) == (0.1, 4, 1, True)
    assert Settings.from_args({"top_k": 1}).top_k == 1


@pytest.mark.parametrize(("args", "words"), [
    ([{"recenter": 1.5}], ["'recenter'", "1.5", "between 0 and 1"]),
    ([{"recenter": "0.5"}], ["'recenter'", "'0.5'", "str", "number"]),
    ([{"recenter": math.nan}], ["'recenter'", "finite"]),
    ([{"temperature_scale": 0}], ["'temperature_scale'", "greater than 0"]),
    ([{"patch_size": 0}], ["'patch_size'", ">= 1"]),
    ([{"patch_size": 2.5}], ["'patch_size'", "2.5", "whole number"]),
    ([{"top_k": -1}], ["'top_k'", "-1", ">= 0"]),
    ([{"probe_every": 0}], ["'probe_every'", ">= 1"]),
    ([{"max_rows_per_call": -2}], ["'max_rows_per_call'", ">= 0"]),
    ([{"enabled": "yes"}], ["'enabled'", "'yes'", "true or false"]),
    ([{"enabled": 1}], ["'enabled'", "true or false"]),
    ([{"composition_map": None}], ["'composition_map'", "None"]),
    ([{"pool": "a,b"}], ["'pool'", "list of LoRA names"]),
    ([{"pool": ["a", 3]}], ["'pool'", "3"]),
    ([{"pool": [""]}], ["'pool'", "non-empty"]),
    ([{"pool": ["a"], "merge_into_base": ["a"]}], ["'a'", "pool and merge_into_base"]),
    ([{"colour": "red", "lamda": 1}], ["'colour'", "'lamda'", "allowed keys", "recenter"]),
    ([True, 0.5, 10, 2, 0, 1, True, [], [], False, 0, "paper", "extra"], ["at most 12", "13"]),
    ([{"method": "merge"}], ["'method'", "'merge'", "'paper'"]),
    ([{"method": 1}], ["'method'", "int"]),
    ([True, True], ["'recenter'", "True", "number"]),
    ("recenter=1", ["list", "settings dict"]),
])
def test_errors_name_field_value_and_allowed(args, words):
    with pytest.raises(SettingsError) as info:
        Settings.from_args(args)
    message = str(info.value)
    for word in words:
        assert word in message, (word, message)
    assert isinstance(info.value, ValueError)


def test_validate_after_direct_change():
    s = Settings(enabled=True)
    s.patch_size = 0
    with pytest.raises(SettingsError, match="patch_size"):
        s.validate()


def test_infotext_round_trip():
    s = Settings(enabled=True, recenter=0.123456789, temperature_scale=7.5, patch_size=3, top_k=2, probe_every=4,
                 text_encoder_per_branch=False, pool=["a b", "c"], merge_into_base=["d"], composition_map=True,
                 max_rows_per_call=6, method="paper")
    text = s.to_infotext()
    assert text[INFOTEXT_KEYS["enabled"]] == "True"
    assert text["LoRAtorio lambda"] == "0.123456789"
    assert text["LoRAtorio temperature"] == "7.5"
    assert text["LoRAtorio patch"] == "3" and text["LoRAtorio top-k"] == "2"
    assert text["LoRAtorio pool"] == "a b, c"
    assert text["LoRAtorio method"] == "paper"
    assert Settings.from_infotext(text) == s.to_dict()
    for method in METHODS:
        assert Settings.from_infotext(s.copy(method=method).to_infotext())["method"] == method
    assert Settings(enabled=False).to_infotext() == {}


def test_infotext_defaults_are_short_and_paste_fills_them():
    text = Settings(enabled=True).to_infotext()
    assert set(text) == {"LoRAtorio", "LoRAtorio method", "LoRAtorio lambda", "LoRAtorio temperature",
                         "LoRAtorio patch", "LoRAtorio top-k", "LoRAtorio probe every", "LoRAtorio TE per branch"}
    assert Settings.from_infotext(text) == Settings(enabled=True).to_dict()


def test_infotext_from_before_the_method_setting_means_the_paper_method():
    # an image made before the setting existed was composed by the paper's step: paste-back must say so
    old = {"LoRAtorio": "True", "LoRAtorio lambda": "0.5", "LoRAtorio temperature": "10"}
    assert Settings.from_infotext(old)["method"] == "paper"


def test_from_infotext_without_entry_and_with_bad_values():
    assert Settings.from_infotext({"Steps": "20"}) == {"enabled": False}
    pasted = Settings.from_infotext({"LoRAtorio": "True", "LoRAtorio patch": "zero", "LoRAtorio lambda": "7"})
    assert pasted["enabled"] and "patch_size" not in pasted and "recenter" not in pasted
    assert pasted["top_k"] == 0
