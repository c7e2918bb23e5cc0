"""Fake ``modules.ui_common``: the refresh symbol and ``create_refresh_button``."""

import gradio as gr

refresh_symbol = "\U0001f504"


def create_refresh_button(refresh_component, refresh_method, refreshed_args, elem_id):
    def refresh():
        refresh_method()
        return refreshed_args() if callable(refreshed_args) else refreshed_args

    button = gr.Button(elem_id=elem_id)
    button.click(fn=refresh, inputs=[], outputs=refresh_component)
    return button
