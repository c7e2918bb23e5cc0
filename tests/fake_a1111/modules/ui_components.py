"""Fake ``modules.ui_components.InputAccordion``: a checkbox whose value is the open state."""

from __future__ import annotations

import gradio as gr


class InputAccordion(gr.Checkbox):
    def __init__(self, value, **kwargs):
        super().__init__(value=value, **kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False
