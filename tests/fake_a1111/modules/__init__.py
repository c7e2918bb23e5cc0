"""Fake ``modules`` package of the A1111 WebUI (installed under that name during a test)."""
