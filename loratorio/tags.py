"""``<lora:...>`` tags of a prompt, read as the WebUI's extra-networks syntax reads them.

Host-free. The rules follow the WebUI's parser and its built-in Lora network:

- a tag is ``<network:arg1:arg2:...>`` with ``network`` made of word characters and the
  arguments running to the first ``>``; the arguments are split at every ``:``;
- ``lora`` and its alias ``lyco`` are LoRA tags;
- an argument is *named* when splitting it at ``=`` gives exactly two parts
  (``te=0.5``), otherwise it is positional;
- ``<lora:name>``, ``<lora:name:te>``, ``<lora:name:te:unet>``, ``<lora:name:te:unet:dyn>``;
  the text-encoder multiplier defaults to 1, the UNet multiplier to the text-encoder
  one, ``te=``, ``unet=`` and ``dyn=`` override the positional values.

A tag whose multipliers do not parse (the WebUI would fail the whole LoRA activation)
is reported in ``TagParse.invalid`` with the reason; a name given twice is reported in
``TagParse.duplicates`` and only its first tag is kept.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

__all__ = ["LORA_NETWORKS", "LoraTag", "TagParse", "parse_lora_tags", "strip_lora_tags"]

LORA_NETWORKS = ("lora", "lyco")

_TAG = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class LoraTag:
    """One LoRA tag: name, text-encoder and UNet multipliers, optional rank limit."""

    name: str
    te: float = 1.0
    unet: float = 1.0
    dyn: int | None = None
    text: str = ""  # the tag as written


@dataclass
class TagParse:
    """Result of :func:`parse_lora_tags`; ``tags`` in prompt order, first occurrence of each name."""

    tags: list[LoraTag] = field(default_factory=list)
    duplicates: list[LoraTag] = field(default_factory=list)
    invalid: list[tuple[str, str]] = field(default_factory=list)  # (tag text, reason)

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.tags]


def _number(text: str, what: str, tag: str, kind=float):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise ValueError(f"{what} {text!r} of {tag} is not a number") from None
    if kind is float and not math.isfinite(value):
        raise ValueError(f"{what} {text!r} of {tag} is not a finite number")
    return value


def _parse_one(args: str, text: str) -> LoraTag:
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in args.split(":"):
        parts = item.split("=", 2)
        if len(parts) == 2:
            named[parts[0]] = parts[1]
        else:
            positional.append(item)
    if not positional or not positional[0]:
        raise ValueError(f"{text} names no LoRA")
    name = positional[0]
    te = _number(positional[1], "text-encoder multiplier", text) if len(positional) > 1 else 1.0
    if "te" in named:
        te = _number(named["te"], "text-encoder multiplier", text)
    unet = _number(positional[2], "UNet multiplier", text) if len(positional) > 2 else te
    if "unet" in named:
        unet = _number(named["unet"], "UNet multiplier", text)
    dyn = _number(positional[3], "rank limit", text, int) if len(positional) > 3 else None
    if "dyn" in named:
        dyn = _number(named["dyn"], "rank limit", text, int)
    return LoraTag(name=name, te=float(te), unet=float(unet), dyn=dyn, text=text)


def parse_lora_tags(prompt: str) -> TagParse:
    """All LoRA tags of ``prompt`` in order (for a batch, pass the first prompt, as the WebUI does)."""
    result = TagParse()
    seen: set[str] = set()
    for match in _TAG.finditer(prompt or ""):
        if match.group(1) not in LORA_NETWORKS:
            continue
        text = match.group(0)
        try:
            tag = _parse_one(match.group(2), text)
        except ValueError as exc:
            result.invalid.append((text, str(exc)))
            continue
        if tag.name in seen:
            result.duplicates.append(tag)
            continue
        seen.add(tag.name)
        result.tags.append(tag)
    return result


def strip_lora_tags(prompt: str, names=None) -> str:
    """``prompt`` without its LoRA tags (only those naming ``names`` when given)."""
    wanted = None if names is None else set(names)

    def drop(match: re.Match) -> str:
        if match.group(1) not in LORA_NETWORKS:
            return match.group(0)
        if wanted is None:
            return ""
        return "" if match.group(2).split(":", 1)[0] in wanted else match.group(0)

    return _TAG.sub(drop, prompt or "")
