"""Properties of the composition step against a slow loop reference."""

import math

import pytest
import torch

from loratorio.fusion import compose, patch_similarity, softmin_weights, temperature


def reference(base_cond, lora_cond, base_uncond, lora_uncond, *, step, x, patch_size, c, recenter, top_k):
    """The method written as loops over patches, straight from the step list."""
    n, b, _, h, w = lora_cond.shape
    res = lambda p: (x - p) if x is not None else p  # noqa: E731
    base_d = res(base_cond.double()).mean(1)
    lora_d = res(lora_cond.double()).mean(2)
    weights = torch.zeros(n, b, 1, h, w, dtype=torch.float64)
    for bi in range(b):
        for py in range(0, h, patch_size):
            for px in range(0, w, patch_size):
                bv = base_d[bi, py:py + patch_size, px:px + patch_size].flatten()
                sims = []
                for i in range(n):
                    lv = lora_d[i, bi, py:py + patch_size, px:px + patch_size].flatten()
                    sims.append(float(bv @ lv) / (max(bv.norm().item(), 1e-8) * max(lv.norm().item(), 1e-8)))
                order = sorted(range(n), key=lambda i: sims[i])
                chosen = order[:top_k] if 0 < top_k < n else list(range(n))
                if step == 0:
                    logits = {i: 0.0 for i in chosen}
                else:
                    tau = 1.0 / (c * step)
                    logits = {i: -sims[i] / tau for i in chosen}
                mx = max(logits.values())
                z = sum(math.exp(v - mx) for v in logits.values())
                for i in chosen:
                    weights[i, bi, 0, py:py + patch_size, px:px + patch_size] = math.exp(logits[i] - mx) / z
    cond = (weights * lora_cond.double()).sum(0)
    uncond = None
    if base_uncond is not None:
        if recenter == 0:
            uncond = base_uncond.double()
        else:
            uncond = recenter * (weights * lora_uncond.double()).sum(0) + (1 - recenter) * base_uncond.double()
    return cond, uncond, weights


def make(n=3, b=2, c=4, h=6, w=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    return t(b, c, h, w), t(n, b, c, h, w), t(b, c, h, w), t(n, b, c, h, w), t(b, c, h, w)


@pytest.mark.parametrize("h,w,p", [(6, 6, 2), (7, 5, 2), (9, 11, 4), (5, 5, 1), (3, 4, 8)])
@pytest.mark.parametrize("step,top_k,use_x", [(0, 0, False), (3, 0, True), (7, 2, False), (2, 1, True)])
def test_matches_loop_reference(h, w, p, step, top_k, use_x):
    base_c, lora_c, base_u, lora_u, x = make(h=h, w=w, seed=h * 100 + w)
    x = x if use_x else None
    got = compose(base_c, lora_c, base_u, lora_u, step=step, x=x, patch_size=p, temperature_scale=10.0,
                  recenter=0.5, top_k=top_k)
    cond, uncond, weights = reference(base_c, lora_c, base_u, lora_u, step=step, x=x, patch_size=p, c=10.0,
                                      recenter=0.5, top_k=top_k)
    assert got.weights.shape == (3, 2, 1, h, w)
    torch.testing.assert_close(got.weights.double(), weights, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.cond.double(), cond, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.uncond.double(), uncond, atol=1e-5, rtol=1e-5)


def test_weights_sum_to_one_and_are_nonnegative():
    base_c, lora_c, base_u, lora_u, _ = make(n=5, h=13, w=10)
    for step in (0, 1, 5, 30):
        wts = compose(base_c, lora_c, base_u, lora_u, step=step, patch_size=3).weights
        assert (wts >= 0).all()
        torch.testing.assert_close(wts.sum(0), torch.ones_like(wts[0]))


def test_step_zero_gives_uniform_weights():
    base_c, lora_c, base_u, lora_u, _ = make(n=4)
    res = compose(base_c, lora_c, base_u, lora_u, step=0)
    torch.testing.assert_close(res.weights, torch.full_like(res.weights, 0.25))
    torch.testing.assert_close(res.cond, lora_c.mean(0))


def test_permuting_loras_permutes_weights():
    base_c, lora_c, base_u, lora_u, _ = make(n=4)
    perm = torch.tensor([2, 0, 3, 1])
    a = compose(base_c, lora_c, base_u, lora_u, step=4, top_k=2)
    b = compose(base_c, lora_c[perm], base_u, lora_u[perm], step=4, top_k=2)
    torch.testing.assert_close(b.weights, a.weights[perm])
    torch.testing.assert_close(b.cond, a.cond)
    torch.testing.assert_close(b.uncond, a.uncond)


def test_single_lora_gives_that_lora():
    base_c, lora_c, base_u, lora_u, _ = make(n=1)
    res = compose(base_c, lora_c, base_u, lora_u, step=5, recenter=0.3)
    torch.testing.assert_close(res.cond, lora_c[0])
    torch.testing.assert_close(res.uncond, 0.3 * lora_u[0] + 0.7 * base_u)


def test_top_k_zeroes_the_rest_per_patch():
    base_c, lora_c, base_u, lora_u, _ = make(n=5, h=8, w=8)
    res = compose(base_c, lora_c, base_u, lora_u, step=6, top_k=2, patch_size=2)
    nonzero = (res.weights > 0).sum(0)
    assert (nonzero == 2).all()
    # The chosen ones are the two least similar per patch.
    sim = patch_similarity(base_c, lora_c, patch_size=2)
    chosen = torch.topk(-sim, 2, dim=0).indices
    wp = res.weights[:, :, 0, ::2, ::2]
    assert (wp.gather(0, chosen) > 0).all()


def test_most_divergent_lora_owns_the_patch():
    base = torch.randn(1, 4, 4, 4)
    same = base.clone().unsqueeze(0)
    other = torch.randn(1, 1, 4, 4, 4)
    res = compose(base, torch.cat([same, other]), step=20, temperature_scale=10.0)
    assert (res.weights[1] > 0.99).all()


def test_denoised_and_noise_forms_give_the_same_step():
    # denoised = x - sigma * eps: mixing either form is the same step.
    _, eps_lora, _, eps_lora_u, _ = make(n=3)
    eps_base, eps_base_u, x = torch.randn(3, 2, 4, 6, 6).unbind(0)
    sigma = 3.7
    noise = compose(eps_base, eps_lora, eps_base_u, eps_lora_u, step=4)
    den = compose(x - sigma * eps_base, x - sigma * eps_lora, x - sigma * eps_base_u, x - sigma * eps_lora_u,
                  step=4, x=x)
    torch.testing.assert_close(den.weights, noise.weights, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(den.cond, x - sigma * noise.cond, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(den.uncond, x - sigma * noise.uncond, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_dtypes_out_match_in_and_similarity_is_fp32(dtype):
    base_c, lora_c, base_u, lora_u, x = make(dtype=dtype)
    res = compose(base_c, lora_c, base_u, lora_u, step=3, x=x)
    assert res.cond.dtype == dtype and res.uncond.dtype == dtype
    assert res.weights.dtype == torch.float32
    ref = compose(base_c.float(), lora_c.float(), base_u.float(), lora_u.float(), step=3, x=x.float())
    torch.testing.assert_close(res.weights, ref.weights, atol=1e-6, rtol=0)
    tol = 1e-2 if dtype == torch.bfloat16 else 2e-3
    torch.testing.assert_close(res.cond.float(), ref.cond, atol=tol, rtol=tol)


def test_no_uncond_and_recenter_zero():
    base_c, lora_c, base_u, _, _ = make()
    res = compose(base_c, lora_c, step=2)
    assert res.uncond is None
    res = compose(base_c, lora_c, base_u, None, step=2, recenter=0.0)
    assert res.uncond is base_u


def test_similarity_and_softmin_helpers():
    assert temperature(0, 10.0) == math.inf
    assert temperature(5, 10.0) == pytest.approx(0.02)
    sim = torch.tensor([[0.1], [0.9], [float("nan")]])
    w = softmin_weights(sim, step=1, temperature_scale=10.0)
    assert torch.isfinite(w).all() and w[0] > w[1] and w[0] > w[2]


@pytest.mark.parametrize("kwargs,match", [
    ({"patch_size": 0}, "patch_size"),
    ({"step": -1}, "step"),
    ({"temperature_scale": 0.0}, "temperature_scale"),
    ({"temperature_scale": -2}, "temperature_scale"),
    ({"recenter": 1.5}, "recenter"),
    ({"recenter": -0.1}, "recenter"),
    ({"top_k": -1}, "top_k"),
    ({"step": 1.5}, "step"),
])
def test_bad_arguments_name_the_argument(kwargs, match):
    base_c, lora_c, base_u, lora_u, _ = make()
    args = {"step": 1, **kwargs}
    with pytest.raises(ValueError, match=match) as info:
        compose(base_c, lora_c, base_u, lora_u, **args)
    assert repr(kwargs[match]) in str(info.value)


def test_bad_shapes_and_counts():
    base_c, lora_c, base_u, lora_u, x = make()
    with pytest.raises(ValueError, match="N = 0"):
        compose(base_c, lora_c[:0], step=1)
    with pytest.raises(ValueError, match="lora_cond"):
        compose(base_c, lora_c[:, :1], step=1)
    with pytest.raises(ValueError, match="base_cond"):
        compose(base_c[0], lora_c, step=1)
    with pytest.raises(ValueError, match="base_uncond"):
        compose(base_c, lora_c, base_u[:, :2], lora_u, step=1)
    with pytest.raises(ValueError, match="x must have shape"):
        compose(base_c, lora_c, base_u, lora_u, step=1, x=x[:1])
    with pytest.raises(ValueError, match="lora_uncond is required"):
        compose(base_c, lora_c, base_u, None, step=1, recenter=0.5)
