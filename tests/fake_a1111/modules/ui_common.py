"""Fake ``modules.ui_common.create_refresh_button``."""

refresh_buttons: list = []


def create_refresh_button(refresh_component, refresh_method, refreshed_args, elem_id):
    refresh_buttons.append((refresh_component, refresh_method, refreshed_args, elem_id))
    return None
