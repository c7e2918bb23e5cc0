"""Fake ``modules.ui_components``: ``InputAccordion`` (a checkbox whose value is the open state, and a
``with`` block that holds the accordion's content) and ``ToolButton``."""

from __future__ import annotations

import gradio as gr


class InputAccordion(gr.Checkbox):
    def __init__(self, value, **kwargs):
        super().__init__(value=value, **kwargs)


class ToolButton(gr.Button):
    pass
