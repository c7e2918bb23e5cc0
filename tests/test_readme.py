"""README.md stays true of the code: settings, labels, infotext keys, API examples, CI commands."""

import json
import pathlib
import re

import pytest

from loratorio.host_options import CACHE_DEFAULT_MB, XYZ_PREFIX
from loratorio.settings import INFOTEXT_KEYS, LABELS, UI_ORDER, Settings

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def code_blocks(lang):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


@pytest.mark.parametrize("name", UI_ORDER)
def test_every_setting_is_documented_with_label_and_key(name):
    assert f"`{name}`" in README
    assert LABELS[name] in README


def test_defaults_in_the_settings_table_match_the_code():
    rows = {m.group(1): m.group(2).strip() for m in re.finditer(r"^\|[^|]*\(`(\w+)`\) \| ([^|]*) \|", README, re.M)}
    d = Settings()
    assert rows["recenter"] == f"{d.recenter:g}"
    assert rows["temperature_scale"] == f"{d.temperature_scale:g}"
    assert rows["patch_size"] == str(d.patch_size)
    assert rows["top_k"] == str(d.top_k)
    assert rows["probe_every"] == str(d.probe_every)
    assert rows["max_rows_per_call"] == str(d.max_rows_per_call)
    assert rows["enabled"] == ("on" if d.enabled else "off")
    assert rows["text_encoder_per_branch"] == ("on" if d.text_encoder_per_branch else "off")
    assert rows["composition_map"] == ("on" if d.composition_map else "off")
    assert f"LoRA weight cache (MB)`,\n{CACHE_DEFAULT_MB}" in README


@pytest.mark.parametrize("key", sorted(INFOTEXT_KEYS.values()))
def test_every_infotext_key_is_documented(key):
    assert f"`{key}" in README


def test_xyz_axes_are_documented():
    for label in ("Enabled", LABELS["recenter"], LABELS["temperature_scale"], LABELS["patch_size"], "Top-k"):
        assert f"`{XYZ_PREFIX}{label}`".replace("\n", " ") in README.replace("\n", " ")


def test_api_examples_parse_as_documented():
    examples = [json.loads(block) for block in code_blocks("json")]
    assert len(examples) == 2
    named, positional = (e["alwayson_scripts"]["LoRAtorio"]["args"] for e in examples)
    s = Settings.from_args(named)
    assert s.enabled and s.recenter == 0.3 and s.top_k == 2 and s.composition_map
    assert len(positional) == len(UI_ORDER)
    assert Settings.from_args(positional) == Settings(enabled=True)
    order = re.search(r"positional values in UI order \((.*?)\)", README, flags=re.S).group(1)
    assert re.findall(r"`(\w+)`", order) == list(UI_ORDER)


def test_contributor_commands_are_what_ci_runs():
    setup, test = (block.strip() for block in code_blocks("bash")[1:3])
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv .venv" in setup and ".venv/bin/pip install -r requirements-test.txt" in setup
    for command in ("python3 -m venv .venv", ".venv/bin/pip install -q -r requirements-test.txt",
                    ".venv/bin/ruff check .", ".venv/bin/python -m pytest"):
        assert command in ci
    assert test == ".venv/bin/ruff check . && .venv/bin/python -m pytest"
    assert "torch==2.13.0" in (ROOT / "requirements-test.txt").read_text()


def test_linked_files_exist():
    for target in re.findall(r"\]\(((?:docs|loratorio)/[^)#]+)\)", README):
        assert (ROOT / target).exists(), target


def test_api_script_name_and_how_script_info_lists_it():
    """The WebUI's API matches script names case-insensitively and lists them in lower case."""
    title = LABELS["enabled"]
    assert f"name for `alwayson_scripts` is `{title}`" in README
    assert "ignores the case" in README and f"lists it as `{title.lower()}`" in README
    assert all(json.loads(block)["alwayson_scripts"].keys() == {title} for block in code_blocks("json"))


def test_the_settings_table_says_what_zero_means():
    """The labels have no room for it; the table does."""
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\|[^|]*\(`(\w+)`\) \|.*$", README, re.M)}
    assert "0 = all LoRAs share every patch" in rows["top_k"]
    assert "0 = no limit" in rows["max_rows_per_call"]
