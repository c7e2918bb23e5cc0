"""A runnable picture of LoRAtorio without a WebUI or a trained model.

``python -m loratorio.demo`` samples one small synthetic "scene" three ways from the same
seed (base model alone, uniform averaging of the LoRA branches, LoRAtorio), writes a PNG
with the three results and each LoRA's weight map, and prints how much of each LoRA's
concept survives in the result.

The synthetic world. Every "model" is the exact denoiser of a Gaussian data
distribution on a ``4 x S x S`` latent: a mean image plus a smooth random texture whose
covariance is diagonal in the 2-D DCT basis (space) and in a fixed orthonormal basis of
the 4 channels. The posterior mean ``E[x0 | x0 + sigma * eps = x]`` of such a
distribution is closed form (a Wiener gain per frequency and channel component), so
every prediction below is exact and cheap, with no training:

- the base model knows a generic scene: a grey figure (head and body) in a landscape.
  Prompted (cond), its mean is that scene; unprompted (uncond), its mean is flat grey
  and its covariance ``uncond_spread ** 2`` times wider (it has to cover every scene),
  so classifier-free guidance has a direction to follow;
- each LoRA is the base distribution with the mean changed only inside its own region
  (a character's face on the head, striped clothing on the body, an evening style on the
  background) and equal to the base everywhere else: the premise of the method, that a
  narrow-domain LoRA predicts what the base predicts outside its domain. A LoRA also
  moves the unconditional mean a little (``uncond_leak``), as a LoRA applied to the whole
  network does.

Every denoiser here returns the *denoised* form (an estimate of the clean latent); the
sampler is deterministic Euler on the Karras sigma schedule in the k-diffusion style
(``d = (x - denoised) / sigma``), and ``loratorio.fusion.compose`` is called with
``x`` so the similarity uses the noise-like residual ``x - denoised`` (method, "Inputs
of one denoising step").

Known limits of the world, so that the picture is read for what it is:

- guidance on Gaussians narrows the distribution sharply: at CFG 6 the random texture
  all but vanishes, so the seed changes the sampling path (and LoRAtorio's weights, which
  follow it) but the final pictures only a little;
- the guided denoiser is stiff for Euler: below about 16 steps grain is left over, and
  below about 10 it grows;
- the temperature of method step 3 grows with the step index, so more steps give
  sharper weights (the paper samples 100-200 steps);
- every change a LoRA makes is an additive mean shift in its own region, so merging the
  LoRAs' weights would be exact here by construction; the world cannot judge weight
  merging, and the demo does not show it.
"""

from __future__ import annotations

import argparse
import math
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from loratorio.fusion import compose

__all__ = [
    "DemoResult",
    "GaussianWorld",
    "concept_survival",
    "karras_sigmas",
    "latent_to_rgb",
    "render_png",
    "run_demo",
    "sample",
]

CHANNELS = 4
METHODS = ("base", "average", "loratorio")
METHOD_LABELS = {"base": "base model", "average": "uniform averaging", "loratorio": "LoRAtorio"}

# A fixed linear map from the 4 latent channels to RGB (channel 3 is brightness), as a
# latent preview does; values around 0 render as mid grey.
_TO_RGB = torch.tensor(
    [
        [1.0, 0.0, 0.0, 0.6],
        [0.0, 1.0, 0.0, 0.6],
        [0.0, 0.0, 1.0, 0.6],
    ]
)


@dataclass(frozen=True)
class Concept:
    """One LoRA of the world: name, region ``[S, S]`` in [0, 1], mean shift ``[C, S, S]``, weight-map colour."""

    name: str
    region: torch.Tensor
    shift: torch.Tensor
    colour: tuple[int, int, int]


def _grid(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel-centre coordinates in [0, 1], ``(rows, cols)`` each ``[S, S]``."""
    axis = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    return torch.meshgrid(axis, axis, indexing="ij")


def _soft(signed_distance: torch.Tensor, size: int) -> torch.Tensor:
    """A region with an edge about one latent pixel wide (inside where the distance < 0)."""
    return torch.sigmoid(-signed_distance * size / 0.8)


def _vec(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64).view(CHANNELS, 1, 1)


class GaussianWorld:
    """Base model and LoRAs as exact denoisers of Gaussian data distributions.

    ``denoise(x, sigma, means, conditional=...)`` returns the posterior mean ``E[x0 | x]``
    for ``x = x0 + sigma * eps`` when ``x0 ~ N(mean, Sigma)``. All conditional models
    share one ``Sigma`` and all unconditional ones another, so within each only the
    means tell the base model and the LoRAs apart. All predictions are in the denoised
    form.
    """

    def __init__(self, size: int = 48, *, texture: float = 0.2, uncond_spread: float = 6.0, uncond_leak: float = 0.2):
        if size < 2:
            raise ValueError(f"size must be >= 2, got {size!r}")
        self.size = size
        rows, cols = _grid(size)

        head = ((rows - 0.30) ** 2 + (cols - 0.50) ** 2).sqrt() - 0.14
        body = torch.maximum((rows - 0.74).abs() - 0.22, (cols - 0.50).abs() - 0.22)
        head_region = _soft(head, size)
        body_region = _soft(body, size) * (1 - head_region)
        figure = (head_region + body_region).clamp(max=1)
        background = 1 - figure
        horizon = torch.sigmoid((rows - 0.62) * size / 1.5)

        self.uncond_mean = torch.zeros(CHANNELS, size, size, dtype=torch.float64)
        sky = _vec(-0.25, 0.0, 0.35, 0.2) * (1 - horizon)
        ground = _vec(-0.15, 0.3, -0.25, -0.1) * horizon
        self.cond_mean = (sky + ground) * background + _vec(0.0, 0.0, 0.0, 0.2) * figure

        # The descriptor of method step 1 averages channels, so a concept is seen through how
        # it moves the channel mean of the residual; every concept here moves the mean itself.
        hair = _soft(rows - 0.27 + 0.05 * ((cols - 0.5) / 0.14) ** 2, size)
        eyes = _soft(((rows - 0.32) ** 2 + ((cols - 0.5).abs() - 0.055) ** 2).sqrt() - 0.018, size)
        skin = _vec(0.45, 0.15, -0.15, 0.3)
        face = skin + (_vec(0.1, -0.15, -0.3, -0.6) - skin) * hair + (_vec(-0.2, -0.2, -0.1, -0.5) - skin) * eyes
        stripes = 0.5 + 0.5 * torch.cos(2 * math.pi * rows * 7)
        evening_sky = _vec(0.6, 0.15, -0.25, 0.25) * (1 - horizon) * (0.4 + 0.8 * rows)
        evening_ground = _vec(0.05, -0.3, 0.0, -0.45) * horizon
        self.concepts = (
            Concept("character", head_region, face * head_region, (255, 170, 90)),
            Concept(
                "clothing",
                body_region,
                (_vec(-0.15, -0.35, 0.45, -0.35) + _vec(0.4, 0.2, -0.3, 0.2) * stripes) * body_region,
                (110, 140, 255),
            ),
            Concept("background", background, (evening_sky + evening_ground) * background, (240, 110, 200)),
        )
        self.uncond_leak = uncond_leak

        # Conditional texture: smooth in space, mostly brightness across channels. The
        # unconditional covariance is the same shape, only wider: a wider one at some
        # frequencies only would make guidance over-sharpen those (rings at edges) and
        # stiffen the sampler there. Both are diagonal in the DCT basis (a stationary prior
        # with mirrored borders, so the top and bottom rows are not neighbours as with an FFT).
        self._dct = _dct_matrix(size)
        freq = torch.arange(size, dtype=torch.float64) / (2 * size)
        radius2 = freq.view(-1, 1) ** 2 + freq.view(1, -1) ** 2
        texture_spectrum = _unit_mean(torch.exp(-radius2 / (2 * 0.08**2)) + 1e-3)
        luma = torch.tensor([0.35, 0.35, 0.35, 0.8], dtype=torch.float64)
        luma = luma / luma.norm()
        channel_cov = texture**2 * (luma[:, None] * luma[None, :]) + (0.4 * texture) ** 2 * torch.eye(CHANNELS)
        eigval, self._basis = torch.linalg.eigh(channel_cov)
        self._cond_prior = eigval.view(-1, 1, 1) * texture_spectrum
        self._uncond_prior = uncond_spread**2 * self._cond_prior

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.concepts]

    def lora_means(self, conditional: bool) -> torch.Tensor:
        """Means ``[N, C, S, S]`` of the LoRA-changed distributions."""
        if conditional:
            return torch.stack([self.cond_mean + c.shift for c in self.concepts])
        return torch.stack([self.uncond_mean + self.uncond_leak * c.shift for c in self.concepts])

    def denoise(self, x: torch.Tensor, sigma: float, means: torch.Tensor, *, conditional: bool) -> torch.Tensor:
        """Exact posterior mean (denoised form): ``x [B, C, S, S]``, ``means [M, C, S, S]`` -> ``[M, B, C, S, S]``.

        ``conditional`` picks the narrow (prompted) or the broad (unprompted) covariance.
        """
        prior = self._cond_prior if conditional else self._uncond_prior
        dev = x.unsqueeze(0) - means.unsqueeze(1)
        coeff = torch.einsum("ck,mbchw->mbkhw", self._basis, dev)
        coeff = self._dct @ coeff @ self._dct.T
        coeff = coeff * (prior / (prior + sigma**2))
        coeff = self._dct.T @ coeff @ self._dct
        return means.unsqueeze(1) + torch.einsum("ck,mbkhw->mbchw", self._basis, coeff)


def _dct_matrix(size: int) -> torch.Tensor:
    """The orthonormal DCT-II matrix ``[S, S]`` (rows are frequencies)."""
    k = torch.arange(size, dtype=torch.float64).view(-1, 1)
    n = torch.arange(size, dtype=torch.float64).view(1, -1)
    mat = torch.cos(math.pi * (n + 0.5) * k / size) * math.sqrt(2 / size)
    mat[0] /= math.sqrt(2)
    return mat


def _unit_mean(spectrum: torch.Tensor) -> torch.Tensor:
    """Scale a power spectrum so that the per-pixel variance it gives (its mean) is 1."""
    return spectrum / spectrum.mean()


def karras_sigmas(steps: int, sigma_min: float = 0.03, sigma_max: float = 8.0, rho: float = 7.0) -> list[float]:
    """The Karras et al. (2022) schedule with a final 0, as k-diffusion builds it."""
    ramp = torch.linspace(0, 1, steps, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [float(s) for s in (hi + ramp * (lo - hi)) ** rho] + [0.0]


@contextmanager
def _one_thread():
    """Run torch on one thread, then restore the setting.

    The tensors here are tiny: worker threads cost far more than they save, most of all
    on a busy machine (tens of times slower on two shared cores).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def sample(
    world: GaussianWorld,
    method: str,
    *,
    seed: int = 0,
    steps: int = 24,
    cfg_scale: float = 6.0,
    only: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Euler sampling with CFG in the denoised form; returns ``(x0 [C, S, S], weights)``.

    ``method`` is ``"base"`` (no LoRA), ``"average"`` (the composite baseline: cond and
    uncond are the plain means of the LoRA branches), ``"loratorio"`` (``compose`` with
    its defaults at step ``k``, method steps 1-8, then guidance, step 9) or ``"alone"``
    (LoRA ``only`` by itself, the reference for how strong its concept can be).
    ``weights`` is the mean over steps of compose's ``[N, 1, S, S]`` weights for
    ``"loratorio"`` and None otherwise.
    """
    if method not in (*METHODS, "alone"):
        raise ValueError(f"method must be one of {(*METHODS, 'alone')}, got {method!r}")
    if method == "alone" and only is None:
        raise ValueError("method 'alone' needs the index of the LoRA in only")
    with _one_thread():
        generator = torch.Generator().manual_seed(seed)
        sigmas = karras_sigmas(steps)
        x = torch.randn(1, CHANNELS, world.size, world.size, generator=generator, dtype=torch.float64) * sigmas[0]
        lora_cond_means, lora_uncond_means = world.lora_means(True), world.lora_means(False)
        weight_sum = None

        for k in range(steps):
            sigma = sigmas[k]
            if method == "base":
                cond = world.denoise(x, sigma, world.cond_mean[None], conditional=True)[0]
                uncond = world.denoise(x, sigma, world.uncond_mean[None], conditional=False)[0]
            elif method == "alone":
                cond = world.denoise(x, sigma, lora_cond_means[only : only + 1], conditional=True)[0]
                uncond = world.denoise(x, sigma, lora_uncond_means[only : only + 1], conditional=False)[0]
            else:
                lora_cond = world.denoise(x, sigma, lora_cond_means, conditional=True)
                lora_uncond = world.denoise(x, sigma, lora_uncond_means, conditional=False)
                if method == "average":
                    cond, uncond = lora_cond.mean(0), lora_uncond.mean(0)
                else:
                    base_cond = world.denoise(x, sigma, world.cond_mean[None], conditional=True)[0]
                    base_uncond = world.denoise(x, sigma, world.uncond_mean[None], conditional=False)[0]
                    res = compose(base_cond, lora_cond, base_uncond, lora_uncond, step=k, x=x)
                    cond, uncond = res.cond, res.uncond
                    weight_sum = res.weights[:, 0] if weight_sum is None else weight_sum + res.weights[:, 0]
            denoised = uncond + cfg_scale * (cond - uncond)
            x = x + (x - denoised) / sigma * (sigmas[k + 1] - sigma)

    weights = None if weight_sum is None else (weight_sum / steps).float()
    return x[0], weights


def concept_survival(result: torch.Tensor, base: torch.Tensor, alone: torch.Tensor, region: torch.Tensor) -> float:
    """How much of a LoRA's own effect is in ``result`` inside its region (1.0 = as strong as that LoRA alone).

    The effect is the difference from the base sample of the same seed; ``result - base``
    is projected on ``alone - base`` over the pixels where ``region > 0.5``.
    """
    inside = region > 0.5
    target = (alone - base)[:, inside]
    got = (result - base)[:, inside]
    return float((got * target).sum() / (target * target).sum())


@dataclass
class DemoResult:
    """One run: samples ``[C, S, S]`` per method and per LoRA alone, LoRAtorio's mean weights ``[N, S, S]``,
    and concept survival per method (one value per LoRA, in the world's order)."""

    world: GaussianWorld
    seed: int
    steps: int
    cfg_scale: float
    samples: dict[str, torch.Tensor]
    alone: list[torch.Tensor]
    weights: torch.Tensor
    survival: dict[str, list[float]]

    def region_weight(self) -> list[float]:
        """Mean LoRAtorio weight of each LoRA inside its own region (``1 / N`` would be no preference)."""
        return [float(self.weights[i][c.region > 0.5].mean()) for i, c in enumerate(self.world.concepts)]


def run_demo(*, size: int = 48, steps: int = 24, seed: int = 0, cfg_scale: float = 6.0) -> DemoResult:
    """Sample the three methods, and each LoRA alone as the reference, from one seed."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps!r}")
    if size < 24:
        # Smaller, the clothing's stripes come near the pixel and patch scale and alias.
        raise ValueError(f"size must be >= 24, got {size!r}")
    world = GaussianWorld(size)
    samples, weights = {}, None
    for method in METHODS:
        samples[method], w = sample(world, method, seed=seed, steps=steps, cfg_scale=cfg_scale)
        if w is not None:
            weights = w[:, 0]
    alone = [
        sample(world, "alone", seed=seed, steps=steps, cfg_scale=cfg_scale, only=i)[0]
        for i in range(len(world.concepts))
    ]
    survival = {
        m: [concept_survival(samples[m], samples["base"], alone[i], c.region) for i, c in enumerate(world.concepts)]
        for m in METHODS
    }
    return DemoResult(world, seed, steps, cfg_scale, samples, alone, weights, survival)


def _upscaled(arr: torch.Tensor, scale: int):
    """``[H, W, 3]`` uint8 -> a PIL image, each latent pixel a ``scale x scale`` block."""
    from PIL import Image

    img = Image.fromarray(arr.contiguous().numpy(), "RGB")
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST)


def latent_to_rgb(latent: torch.Tensor) -> torch.Tensor:
    """``[C, S, S]`` latent -> ``[S, S, 3]`` uint8 through the fixed preview projection."""
    rgb = torch.einsum("rc,chw->hwr", _TO_RGB.to(latent.dtype), latent)
    return ((0.5 + 0.5 * rgb).clamp(0, 1) * 255).round().to(torch.uint8)


def _weight_rgb(weights: torch.Tensor, colour: tuple[int, int, int]) -> torch.Tensor:
    """``[S, S]`` weights in [0, 1] -> ``[S, S, 3]`` uint8, from near black (0) to ``colour`` (1)."""
    dark = torch.tensor([18.0, 18.0, 24.0])
    w = weights.float().clamp(0, 1).unsqueeze(-1)
    return (dark + w * (torch.tensor(colour, dtype=torch.float32) - dark)).round().to(torch.uint8)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: only the fixed bitmap font
        return ImageFont.load_default()


def render_png(result: DemoResult, path: str | Path, *, scale: int | None = None) -> Path:
    """Write the picture: base / uniform averaging / LoRAtorio, then each LoRA's mean LoRAtorio weight map."""
    from PIL import Image, ImageDraw

    size = result.world.size
    scale = scale or max(1, 240 // size)
    tile, pad, label_h, title_h, foot_h = size * scale, 14, 42, 36, 44
    cols = max(len(METHODS), len(result.world.concepts))
    width = cols * tile + (cols + 1) * pad
    height = title_h + 2 * (label_h + tile) + pad + foot_h
    canvas = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(canvas)
    big, small = _font(17), _font(13)
    ink, grey = (20, 20, 20), (90, 90, 90)
    draw.text((pad, 10), "LoRAtorio on a synthetic world of exact Gaussian denoisers", fill=ink, font=big)

    y = title_h
    for j, method in enumerate(METHODS):
        x = pad + j * (tile + pad)
        draw.text((x, y + 2), METHOD_LABELS[method], fill=ink, font=big)
        if method == "base":
            draw.text((x, y + 23), "no LoRA", fill=grey, font=small)
        else:
            kept = " / ".join(f"{v:.2f}" for v in result.survival[method])
            draw.text((x, y + 23), f"concepts kept {kept}", fill=grey, font=small)
        canvas.paste(_upscaled(latent_to_rgb(result.samples[method]), scale), (x, y + label_h))

    y += label_h + tile + pad
    for i, concept in enumerate(result.world.concepts):
        x = pad + i * (tile + pad)
        draw.text((x, y + 2), f"weight of LoRA '{concept.name}'", fill=ink, font=big)
        draw.text((x, y + 23), f"mean over steps; in its region {result.region_weight()[i]:.2f}", fill=grey, font=small)
        canvas.paste(_upscaled(_weight_rgb(result.weights[i], concept.colour), scale), (x, y + label_h))

    y += label_h + tile + 8
    names = " / ".join(result.world.names)
    lines = (
        f"Same seed ({result.seed}), {result.steps} Euler steps, CFG {result.cfg_scale:g}. Concepts kept ({names}):",
        "1.00 = as strong as that LoRA alone. Weight maps: dark 0, bright 1.",
    )
    for k, line in enumerate(lines):
        draw.text((pad, y + 18 * k), line, fill=grey, font=small)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path


def render_composition_map(result: DemoResult, path: str | Path, *, scale: int = 6) -> Path:
    """The LoRAtorio sample with its composition map, through the extension's own renderer."""
    from .compmap import render_map

    image = _upscaled(latent_to_rgb(result.samples["loratorio"]), scale)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    render_map(image, result.weights, result.world.names).save(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loratorio.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="docs/images/demo.png", help="PNG to write (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=24, help="sampling steps (default: %(default)s)")
    parser.add_argument("--size", type=int, default=48, help="latent size S of the S x S world (default: %(default)s)")
    parser.add_argument("--cfg", type=float, default=6.0, help="guidance scale (default: %(default)s)")
    parser.add_argument("--map-out", default="docs/images/composition_map.png",
                        help="PNG of LoRAtorio's composition map, drawn as the extension draws it "
                             "(default: %(default)s; empty to skip)")
    args = parser.parse_args(argv)
    try:
        result = run_demo(size=args.size, steps=args.steps, seed=args.seed, cfg_scale=args.cfg)
    except ValueError as exc:
        parser.error(str(exc))
    path = render_png(result, args.out)
    if args.map_out:
        map_path = render_composition_map(result, args.map_out)

    print("How much of each LoRA's concept survives (1.00 = as strong as that LoRA alone):")
    print(f"  {'':<20}" + "".join(f"{n:>12}" for n in result.world.names))
    for method in METHODS[1:]:
        print(f"  {METHOD_LABELS[method]:<20}" + "".join(f"{v:>12.2f}" for v in result.survival[method]))
    n = len(result.world.concepts)
    print(f"Mean LoRAtorio weight of each LoRA in its own region ({1 / n:.2f} = no preference):")
    print(f"  {'':<20}" + "".join(f"{v:>12.2f}" for v in result.region_weight()))
    print(f"wrote {path}")
    if args.map_out:
        print(f"wrote {map_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
