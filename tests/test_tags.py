"""LoRA tags read the way the WebUI's extra-networks syntax and built-in Lora read them."""

from __future__ import annotations

from loratorio.tags import LoraTag, parse_lora_tags, strip_lora_tags


def tags(prompt):
    return [(t.name, t.te, t.unet, t.dyn) for t in parse_lora_tags(prompt).tags]


def test_forms():
    assert tags("<lora:a>") == [("a", 1.0, 1.0, None)]
    assert tags("<lora:a:0.5>") == [("a", 0.5, 0.5, None)]  # the UNet multiplier follows te
    assert tags("<lora:a:0.5:0.8>") == [("a", 0.5, 0.8, None)]
    assert tags("<lora:a:0.5:0.8:16>") == [("a", 0.5, 0.8, 16)]
    assert tags("<lora:a:te=0.2>") == [("a", 0.2, 0.2, None)]
    assert tags("<lora:a:0.7:unet=0.1>") == [("a", 0.7, 0.1, None)]
    assert tags("<lora:a:unet=0.3:te=0.4>") == [("a", 0.4, 0.3, None)]
    assert tags("<lora:a:1:dyn=8>") == [("a", 1.0, 1.0, 8)]
    assert tags("<lyco:a:0.9>") == [("a", 0.9, 0.9, None)]
    assert tags("<lora:a:-0.5>") == [("a", -0.5, -0.5, None)]


def test_prompt_order_other_networks_and_names():
    prompt = "x <hypernet:h:1> <lora:b:0.3>, y <lora:a> <embedding:e> <lora:my lora v2:1>"
    assert [t.name for t in parse_lora_tags(prompt).tags] == ["b", "a", "my lora v2"]
    assert parse_lora_tags("").tags == [] and parse_lora_tags(None).tags == []


def test_named_item_needs_exactly_one_equals_sign():
    # "a=b=c" splits into three parts: positional, as in the WebUI
    assert tags("<lora:a:te=1=2>") == []
    assert parse_lora_tags("<lora:a:te=1=2>").invalid


def test_duplicates_and_invalid():
    parsed = parse_lora_tags("<lora:a:0.5> <lora:b> <lora:a:1> <lora:c:abc> <lora:te=1> <lora:d:nan>")
    assert parsed.names == ["a", "b"]
    assert parsed.tags[0] == LoraTag("a", 0.5, 0.5, None, "<lora:a:0.5>")
    assert [t.text for t in parsed.duplicates] == ["<lora:a:1>"]
    reasons = dict(parsed.invalid)
    assert "'abc'" in reasons["<lora:c:abc>"] and "not a number" in reasons["<lora:c:abc>"]
    assert "names no LoRA" in reasons["<lora:te=1>"]
    assert "finite" in reasons["<lora:d:nan>"]


def test_strip():
    assert strip_lora_tags("a <lora:x:1> b <hypernet:h> <lyco:y>") == "a  b <hypernet:h> "
    assert strip_lora_tags("a <lora:x:1> <lora:y>", names=["y"]) == "a <lora:x:1> "
