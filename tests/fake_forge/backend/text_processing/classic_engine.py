"""Fake of ``backend/text_processing/classic_engine.py``: extra infotext the text engine leaves behind."""

last_extra_generation_params: dict = {}
