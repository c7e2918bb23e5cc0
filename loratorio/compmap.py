"""Composition map: which LoRA acted where, as a picture.

Host-free (torch, numpy, Pillow). Each LoRA gets a colour; a pixel's colour is the mix of
the LoRAs' colours by their fusion weights (method step 4-6, averaged over the steps of
the generation), blended over the generated image, with a legend of the LoRA names.
Weights of the delta mixes are gates (each LoRA's share of its own change, in [0, 1]):
where they add up to more than one the colours are mixed in proportion, where less the
mix darkens (the LoRAs hold back there).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = ["PALETTE", "colorize", "render_map"]

# Distinguishable colours (Okabe-Ito, then a few more); cycles past the end.
PALETTE: tuple[tuple[int, int, int], ...] = (
    (230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178),
    (213, 94, 0), (204, 121, 167), (120, 120, 120), (255, 255, 255), (148, 103, 189),
    (140, 86, 75), (23, 190, 207),
)


def colorize(weights: torch.Tensor, colors: Sequence[tuple[int, int, int]] | None = None) -> np.ndarray:
    """``weights [N, H, W]`` (non-negative) -> ``uint8 [H, W, 3]`` mixed colours (weights summing to one mix
    as they are; larger sums are scaled down to one)."""
    if weights.dim() != 3:
        raise ValueError(f"weights must be [N, H, W], got {list(weights.shape)}")
    n = weights.shape[0]
    colors = colors or [PALETTE[i % len(PALETTE)] for i in range(n)]
    table = torch.tensor(colors[:n], dtype=torch.float32)  # [N, 3]
    w = weights.detach().float().cpu().clamp(min=0)
    w = w / w.sum(0, keepdim=True).clamp(min=1.0)
    mixed = torch.einsum("nhw,nc->hwc", w, table)
    return mixed.clamp(0, 255).round().to(torch.uint8).numpy()


def render_map(image: Image.Image, weights: torch.Tensor, names: Sequence[str], opacity: float = 0.6,
               legend: bool = True) -> Image.Image:
    """The composition map of one generated image.

    ``weights [N, h, w]`` at latent resolution are upsampled (nearest: one latent pixel
    is one block of image pixels) to the image size, coloured, and blended over the
    image with ``opacity``; the legend lists ``names`` with their colours.
    """
    if weights.shape[0] != len(names):
        raise ValueError(f"{weights.shape[0]} weight maps for {len(names)} names")
    base = image.convert("RGB")
    colors = [PALETTE[i % len(PALETTE)] for i in range(len(names))]
    overlay = Image.fromarray(colorize(weights, colors), "RGB").resize(base.size, Image.NEAREST)
    out = Image.blend(base, overlay, float(opacity))
    if legend and names:
        _draw_legend(out, names, colors)
    return out


def _draw_legend(img: Image.Image, names: Sequence[str], colors) -> None:
    draw = ImageDraw.Draw(img, "RGBA")
    font = ImageFont.load_default()
    pad, box = 4, 10
    heights, widths = [], []
    for name in names:
        left, top, right, bottom = draw.textbbox((0, 0), name, font=font)
        widths.append(right - left)
        heights.append(max(bottom - top, box))
    width = pad * 3 + box + max(widths)
    height = pad * (len(names) + 1) + sum(heights)
    draw.rectangle((0, 0, width, height), fill=(0, 0, 0, 160))
    y = pad
    for name, color, h in zip(names, colors, heights, strict=True):
        draw.rectangle((pad, y, pad + box, y + box), fill=(*color, 255), outline=(255, 255, 255, 255))
        draw.text((pad * 2 + box, y), name, fill=(255, 255, 255, 255), font=font)
        y += h + pad
