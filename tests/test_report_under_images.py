"""The ``LoRAtorio: ...`` report reaches the text the UI shows under the images, on both hosts.

The WebUI shows the result's ``comments`` string under the images. It copies
``p.comments`` into that string when it builds the result, before the scripts'
``postprocess`` hook runs; the fakes of both hosts do the same. These tests read the
result's ``comments`` (what the page shows) and its ``js()`` (what the API returns), never
``p.comments``, which the user does not see.
"""

from __future__ import annotations

import json

import pytest

from loratorio.loading import Reason
from loratorio.settings import INFOTEXT_KEYS
from tests.soak import light_host


@pytest.fixture(params=["a1111", "forge"])
def host(request, monkeypatch, tmp_path):
    from tests.lora_files import write_lora

    h = light_host(request.param, monkeypatch, tmp_path)
    write_lora(h.lora_dir / "good.safetensors", {**h.unet, **h.te}, seed=1)
    write_lora(h.lora_dir / "good2.safetensors", dict(h.unet), seed=2)
    h.refresh()
    return h


def shown(res) -> list[str]:
    """The lines under the images in the UI."""
    return res.processed.comments.splitlines()


def test_the_report_is_shown_under_the_images(host):
    res = host.run("a cat <lora:good> <lora:ghost>")
    line = f"LoRAtorio: composing 1 LoRA(s): good; skipped ghost: {Reason.NOT_FOUND}"
    assert shown(res) == [line]


def test_a_composition_without_problems_says_what_was_composed(host):
    res = host.run("a cat <lora:good> <lora:good2:0.5>")
    assert shown(res) == ["LoRAtorio: composing 2 LoRA(s): good, good2"]


def test_dropped_steps_are_shown_under_the_images(host):
    from tests.lora_files import write_lora

    write_lora(host.lora_dir / "huge.safetensors", dict(host.unet), seed=11, std=1e19)
    host.refresh()
    res = host.run("a cat <lora:good> <lora:huge>", {"recenter": 0.0})
    [line] = shown(res)
    assert line.startswith("LoRAtorio: composing 2 LoRA(s): good, huge; huge gave non-finite output at ")
    assert line.endswith(" step(s), left out there")


def test_a_refused_generation_says_so_once(host):
    def refiner(p):
        p.refiner_checkpoint_info = object()

    res = host.run("a cat <lora:good>", prepare=refiner)
    assert shown(res) == [f"LoRAtorio: {Reason.REFINER}; generating without it"]


def test_an_error_in_the_last_hook_follows_the_report_on_its_own_line(host, monkeypatch):
    from loratorio import host_a1111, host_forge

    def broken(state, processed):
        raise RuntimeError("injected")

    for adapter in (host_a1111, host_forge):  # each adapter's postprocess calls the shared function
        monkeypatch.setattr(adapter, "append_maps", broken)
    res = host.run("a cat <lora:good> <lora:good2>", {"composition_map": True})
    assert shown(res) == [
        "LoRAtorio: composing 2 LoRA(s): good, good2",
        "LoRAtorio: adding the composition map failed after the images were made: RuntimeError: injected",
    ]
    assert res.processed.comments.endswith("\n")  # the WebUI's own format: one line per comment


def test_the_api_returns_the_report_in_the_infotext(host):
    """The API's ``info`` is the result's ``js()``: the infotexts, no comments."""
    res = host.run("a cat <lora:good> <lora:ghost>")
    info = json.loads(res.processed.js())
    assert "comments" not in info
    infotext = info["infotexts"][0]
    assert f"{INFOTEXT_KEYS['skipped']}: " in infotext and f"ghost: {Reason.NOT_FOUND}" in infotext, infotext


@pytest.mark.parametrize("hook, seen", [("postprocess_batch", True), ("postprocess", False)])
def test_the_fakes_copy_the_comments_where_the_webuis_do(host, hook, seen):
    """A plain ``p.comment()`` reaches the page from ``postprocess_batch``, not from ``postprocess``."""
    def prepare(p):
        original = getattr(p.scripts, hook)

        def hooked(p, *args, **kwargs):
            p.comment(f"from {hook}")
            return original(p, *args, **kwargs)

        setattr(p.scripts, hook, hooked)

    res = host.run("a cat", False, prepare=prepare)
    assert (f"from {hook}" in shown(res)) is seen
    assert f"from {hook}" in res.p.comments
