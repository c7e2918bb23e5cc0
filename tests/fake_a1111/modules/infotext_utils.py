"""Fake ``modules.infotext_utils``: writing and parsing the parameters line of an infotext."""

from __future__ import annotations

import json


def quote(text):
    text = str(text)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text):
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def _split_fields(line: str) -> list[str]:
    """Split at commas that are not inside a JSON-quoted value."""
    fields, current, quoted, escaped = [], [], False, False
    for ch in line:
        if quoted:
            current.append(ch)
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                quoted = False
        elif ch == '"':
            quoted = True
            current.append(ch)
        elif ch == ",":
            fields.append("".join(current))
            current = []
        else:
            current.append(ch)
    fields.append("".join(current))
    return fields


def parse_generation_parameters(text: str) -> dict:
    lines = text.strip().split("\n")
    params = {"Prompt": lines[0]}
    for field in _split_fields(lines[-1]):
        key, sep, value = field.partition(":")
        if sep:
            params[key.strip()] = unquote(value.strip())
    return params


def create_parameters_line(params: dict) -> str:
    return ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
