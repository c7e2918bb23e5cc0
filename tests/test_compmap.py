"""Composition map colours and rendering."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from loratorio.compmap import PALETTE, colorize, render_map


def test_colorize_mixes_palette_by_weight():
    w = torch.zeros(2, 2, 3)
    w[0, 0] = 1.0
    w[1, 1] = 1.0
    w[:, :, 2] = 0.5
    out = colorize(w)
    assert out.shape == (2, 3, 3) and out.dtype == np.uint8
    assert tuple(out[0, 0]) == PALETTE[0] and tuple(out[1, 1]) == PALETTE[1]
    expected = np.round((np.array(PALETTE[0]) + np.array(PALETTE[1])) / 2)
    assert np.array_equal(out[0, 2], expected)


def test_render_map_upsamples_blends_and_keeps_size():
    image = Image.new("RGB", (64, 48), (0, 0, 0))
    w = torch.zeros(2, 6, 8)
    w[0, :, :4] = 1.0
    w[1, :, 4:] = 1.0
    out = render_map(image, w, ["left", "right"], opacity=0.5, legend=False)
    assert out.size == (64, 48)
    px = np.asarray(out)
    assert np.allclose(px[40, 5], np.array(PALETTE[0]) * 0.5, atol=1)
    assert np.allclose(px[40, 60], np.array(PALETTE[1]) * 0.5, atol=1)
    with_legend = np.asarray(render_map(image, w, ["left", "right"], opacity=0.5))
    assert not np.array_equal(with_legend[:12, :40], px[:12, :40])  # legend drawn top-left
    assert np.array_equal(with_legend[40:, 50:], px[40:, 50:])


def test_render_map_checks_names():
    with pytest.raises(ValueError, match="2 weight maps for 1 names"):
        render_map(Image.new("RGB", (8, 8)), torch.ones(2, 1, 1) / 2, ["a"])
