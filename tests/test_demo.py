"""The synthetic demo: exact world, concept survival, weight maps, picture and command line."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from loratorio import demo

SIZE, STEPS = 32, 24


@pytest.fixture(scope="module")
def result() -> demo.DemoResult:
    return demo.run_demo(size=SIZE, steps=STEPS, seed=0)


def test_dct_basis_is_orthonormal():
    dct = demo._dct_matrix(11)
    assert torch.allclose(dct @ dct.T, torch.eye(11, dtype=dct.dtype), atol=1e-12)


@pytest.mark.parametrize("conditional", [True, False])
def test_denoiser_is_the_exact_posterior_mean(conditional):
    # Dense reference: Sigma = A diag(prior) A^T with A the channel basis (x) the spatial
    # DCT basis, and E[x0 | x] = mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu).
    world = demo.GaussianWorld(8)
    prior = (world._cond_prior if conditional else world._uncond_prior).reshape(-1)
    spatial = torch.kron(world._dct.T, world._dct.T)
    basis = torch.kron(world._basis, spatial)
    cov = basis @ torch.diag(prior) @ basis.T
    mean = world.lora_means(conditional)[1]
    x = torch.randn(2, demo.CHANNELS, 8, 8, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    sigma = 0.7
    eye = torch.eye(cov.shape[0], dtype=cov.dtype)
    dev = (x - mean).reshape(2, -1).T
    expected = mean.reshape(-1, 1) + cov @ torch.linalg.solve(cov + sigma**2 * eye, dev)
    got = world.denoise(x, sigma, mean[None], conditional=conditional)[0].reshape(2, -1).T
    assert torch.allclose(got, expected, atol=1e-10)


@pytest.mark.parametrize("sigma", [4.0, 1.0, 0.3, 0.1])
def test_each_lora_predicts_the_base_outside_its_region(sigma):
    world = demo.GaussianWorld(SIZE)
    gen = torch.Generator().manual_seed(1)
    x = world.cond_mean + sigma * torch.randn(1, demo.CHANNELS, SIZE, SIZE, generator=gen, dtype=torch.float64)
    base = world.denoise(x, sigma, world.cond_mean[None], conditional=True)[0, 0]
    loras = world.denoise(x, sigma, world.lora_means(True), conditional=True)[:, 0]
    for i, concept in enumerate(world.concepts):
        diff2 = ((loras[i] - base) ** 2).sum(0)
        outside = concept.region < 0.05
        assert diff2.sum() > 1e-3
        assert diff2[outside].sum() / diff2.sum() < 0.02, concept.name


def test_averaging_dilutes_every_concept_to_about_one_in_n(result):
    n = len(result.world.concepts)
    # The world is linear in the means, so averaging the branches is exactly the mean of
    # the single-LoRA effects.
    mean_effect = torch.stack([a - result.samples["base"] for a in result.alone]).mean(0)
    assert torch.allclose(result.samples["average"] - result.samples["base"], mean_effect, atol=1e-9)
    for kept in result.survival["average"]:
        assert abs(kept - 1 / n) < 0.07


def test_loratorio_keeps_each_concept_far_better_than_averaging(result):
    for name, kept, avg in zip(result.world.names, result.survival["loratorio"], result.survival["average"]):
        assert kept > 0.65, name
        assert kept > avg + 0.3, name


def test_weight_maps_concentrate_on_each_loras_region(result):
    n = len(result.world.concepts)
    assert result.weights.shape == (n, SIZE, SIZE)
    assert torch.allclose(result.weights.sum(0), torch.ones(SIZE, SIZE), atol=1e-5)
    in_region = result.region_weight()
    for i, concept in enumerate(result.world.concepts):
        assert in_region[i] > 1 / n + 0.15, concept.name
        inside = concept.region > 0.5
        for j in range(n):
            if j != i:
                assert result.weights[j][inside].mean() < in_region[i] - 0.2, (concept.name, j)


def test_run_is_deterministic(result):
    world = demo.GaussianWorld(SIZE)
    again, weights = demo.sample(world, "loratorio", seed=0, steps=STEPS)
    assert torch.equal(again, result.samples["loratorio"])
    assert torch.equal(weights[:, 0], result.weights)
    other, _ = demo.sample(world, "loratorio", seed=1, steps=STEPS)
    assert not torch.equal(other, result.samples["loratorio"])


def test_png_layout_and_content(result, tmp_path):
    path = demo.render_png(result, tmp_path / "sub" / "demo.png")
    img = Image.open(path).convert("RGB")
    scale, pad, tile = 240 // SIZE, 14, (240 // SIZE) * SIZE
    assert img.size == (3 * tile + 4 * pad, 36 + 2 * (42 + tile) + pad + 44) == (728, 626)
    # The LoRAtorio tile (third column, first row) shows the sample through the preview map.
    rgb = demo.latent_to_rgb(result.samples["loratorio"])
    left, top = pad + 2 * (tile + pad), 36 + 42
    for r, c in [(5, 16), (16, 16), (26, 10), (2, 30)]:
        assert img.getpixel((left + c * scale + scale // 2, top + r * scale + scale // 2)) == tuple(rgb[r, c].tolist())


def test_command_line_prints_survival_and_writes_png(tmp_path, capsys):
    out, map_out = tmp_path / "demo.png", tmp_path / "map.png"
    assert demo.main(["--out", str(out), "--map-out", str(map_out), "--size", "24", "--steps", "16",
                      "--seed", "2"]) == 0
    text = capsys.readouterr().out
    rows = {
        line.split()[0]: line.split()[-3:] for line in text.splitlines() if line.startswith(("  uniform", "  LoRA"))
    }
    assert set(rows) == {"uniform", "LoRAtorio"}
    for avg, kept in zip(map(float, rows["uniform"]), map(float, rows["LoRAtorio"])):
        assert kept > avg
    assert Image.open(out).size == (3 * 240 + 4 * 14, 36 + 2 * (42 + 240) + 14 + 44)
    assert Image.open(map_out).size == (24 * 6, 24 * 6)
    with pytest.raises(SystemExit):
        demo.main(["--out", str(out), "--map-out", "", "--size", "16"])


def test_bad_method_is_refused():
    world = demo.GaussianWorld(8)
    with pytest.raises(ValueError, match="method"):
        demo.sample(world, "merge")
    with pytest.raises(ValueError, match="only"):
        demo.sample(world, "alone")
