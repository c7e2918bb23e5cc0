"""Forge's own package; its presence is how a script tells Forge from A1111."""
