"""Fake of ``modules/errors.py``: the WebUI prints an exception and carries on."""

from __future__ import annotations

REPORTED: list[tuple[BaseException, str]] = []


def display(e, task, *, full_traceback=False):
    REPORTED.append((e, task))


def report(message, *, exc_info=False):
    REPORTED.append((None, message))
