"""The composition options beyond the paper's step (descriptor, centring, delta mixes) and the named methods."""

import pytest
import torch

from loratorio.engine import Composer
from loratorio.fusion import METHODS, compose, method_options, patch_similarity
from loratorio.settings import Settings


def preds(n=3, b=2, c=4, h=6, w=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return t(b, c, h, w), t(n, b, c, h, w), t(b, c, h, w), t(n, b, c, h, w), t(b, c, h, w)


def merged_of(base, loras, seed=0):
    """A stand-in for the merged row: every LoRA's difference plus a cross-effect none of them has alone."""
    g = torch.Generator().manual_seed(100 + seed)
    return base + (loras - base).sum(0) + 0.3 * torch.randn(base.shape, generator=g, dtype=base.dtype)


OPTIONS = [
    dict(descriptor="channels"),
    dict(centred=True),
    dict(descriptor="activity", mix="delta"),
    dict(descriptor="channels", centred=True, mix="delta"),
    dict(mix="sum"),
    dict(mix="resolve", descriptor="channels", centred=True),
    *(method_options(m) for m in METHODS),
]


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "paper")
@pytest.mark.parametrize("step,top_k,recenter", [(0, 0, 0.5), (4, 0, 1.0), (6, 2, 0.5)])
def test_both_prediction_forms_give_the_same_step(options, step, top_k, recenter):
    # denoised = x - sigma * eps: mixing either form must give the same guided step
    eps_c, lora_c, eps_u, lora_u, x = preds(seed=step)
    m_c, m_u = merged_of(eps_c, lora_c, seed=step), merged_of(eps_u, lora_u, seed=step + 1)
    sigma = 2.5
    noise_merged = dict(merged_cond=m_c, merged_uncond=m_u) if options.get("joint") else {}
    den_merged = dict(merged_cond=x - sigma * m_c, merged_uncond=x - sigma * m_u) if options.get("joint") else {}
    noise = compose(eps_c, lora_c, eps_u, lora_u, step=step, recenter=recenter, top_k=top_k, **options,
                    **noise_merged)
    den = compose(x - sigma * eps_c, x - sigma * lora_c, x - sigma * eps_u, x - sigma * lora_u, step=step, x=x,
                  recenter=recenter, top_k=top_k, **options, **den_merged)
    # the similarity is computed in float32 and a sharp SoftMin magnifies its rounding: tolerance 1e-4
    assert torch.allclose(den.cond, x - sigma * noise.cond, atol=1e-4)
    assert torch.allclose(den.uncond, x - sigma * noise.uncond, atol=1e-4)
    assert torch.allclose(den.weights, noise.weights, atol=1e-5)


def test_sum_mix_adds_every_difference_in_full():
    base_c, lora_c, base_u, lora_u, _ = preds()
    res = compose(base_c, lora_c, base_u, lora_u, step=5, recenter=1.0, mix="sum")
    assert torch.allclose(res.cond, base_c + (lora_c - base_c).sum(0))
    assert torch.allclose(res.uncond, base_u + (lora_u - base_u).sum(0))
    half = compose(base_c, lora_c, base_u, lora_u, step=5, recenter=0.5, mix="sum")
    assert torch.allclose(half.uncond, base_u + 0.5 * (lora_u - base_u).sum(0))
    assert torch.equal(res.weights, torch.ones_like(res.weights))


def test_sum_mix_with_top_k_keeps_the_selected_differences():
    base_c, lora_c, base_u, lora_u, _ = preds(h=4, w=4)
    res = compose(base_c, lora_c, base_u, lora_u, step=3, recenter=1.0, mix="sum", top_k=1, patch_size=2)
    assert torch.equal(res.weights.sum(0), torch.ones_like(res.weights[0]))  # one LoRA per patch, in full
    assert set(res.weights.unique().tolist()) <= {0.0, 1.0}


def test_delta_gates_give_the_winner_its_full_difference():
    base_c, lora_c, base_u, lora_u, _ = preds()
    res = compose(base_c, lora_c, base_u, lora_u, step=8, recenter=1.0, mix="delta")
    gates = res.weights
    assert gates.min() >= 0 and gates.max() <= 1 + 1e-12
    assert torch.allclose(gates.amax(0), torch.ones_like(gates[0]))  # every pixel has a LoRA in full
    assert torch.allclose(res.cond, base_c + (gates * (lora_c - base_c)).sum(0))
    # at the first step the temperature is infinite: every gate is 1, the step is the sum mix
    first = compose(base_c, lora_c, base_u, lora_u, step=0, recenter=1.0, mix="delta")
    assert torch.allclose(first.cond, base_c + (lora_c - base_c).sum(0))


def test_a_lora_equal_to_the_base_adds_nothing_in_delta_mixes():
    base_c, lora_c, base_u, lora_u, _ = preds()
    lora_c[1], lora_u[1] = base_c, base_u
    for mix in ("delta", "sum"):
        full = compose(base_c, lora_c, base_u, lora_u, step=0, recenter=1.0, mix=mix)
        without = compose(base_c, lora_c[[0, 2]], base_u, lora_u[[0, 2]], step=0, recenter=1.0, mix=mix)
        assert torch.allclose(full.cond, without.cond) and torch.allclose(full.uncond, without.uncond)


def test_channels_descriptor_sees_a_hue_change_the_channel_mean_hides():
    base = torch.randn(1, 3, 4, 4, dtype=torch.float64)
    lora = base.expand(2, 1, 3, 4, 4).clone()
    # LoRA 0 moves value between channels in the top-left patch: the channel mean stays the same
    lora[0, 0, 0, :2, :2] += 3.0
    lora[0, 0, 1, :2, :2] -= 3.0
    lora[1, 0, :, :2, :2] *= 1.0001  # LoRA 1: essentially the base
    mean = patch_similarity(base, lora, patch_size=2)
    chans = patch_similarity(base, lora, patch_size=2, descriptor="channels")
    assert mean[0, 0, 0, 0] > 0.999  # invisible to the paper's descriptor
    assert chans[0, 0, 0, 0] < chans[1, 0, 0, 0] - 0.1


def test_centring_and_activity_let_a_local_lora_beat_a_global_one():
    torch.manual_seed(0)
    base = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    lora = base.expand(2, 1, 4, 8, 8).clone()
    lora[0] += 0.6 * torch.randn(1, 4, 8, 8, dtype=torch.float64)  # a global change everywhere
    lora[1, :, :, :2, :2] += 0.5 * torch.randn(1, 4, 2, 2, dtype=torch.float64)  # a local change, smaller
    plain = patch_similarity(base, lora, patch_size=2, descriptor="channels")
    centred = patch_similarity(base, lora, patch_size=2, descriptor="channels", centred=True)
    activity = patch_similarity(base, lora, patch_size=2, descriptor="activity")
    assert plain[0, 0, 0, 0] < plain[1, 0, 0, 0]  # uncentred: the global LoRA looks more different
    assert centred[1, 0, 0, 0] < centred[0, 0, 0, 0]  # centred: the local LoRA owns its patch
    assert activity[1, 0, 0, 0] < activity[0, 0, 0, 0]


@pytest.mark.parametrize("bad,match", [(dict(descriptor="median"), "descriptor"), (dict(mix="max"), "mix")])
def test_unknown_options_are_refused(bad, match):
    base_c, lora_c, base_u, lora_u, _ = preds()
    with pytest.raises(ValueError, match=match):
        compose(base_c, lora_c, base_u, lora_u, step=1, **bad)


def test_named_methods():
    assert method_options("paper") == {}
    with pytest.raises(ValueError, match="unknown composition method"):
        method_options("nope")
    for name in METHODS:
        options = method_options(name)
        assert set(options) <= {"descriptor", "centred", "mix", "joint"}


@pytest.mark.parametrize("method", list(METHODS))
def test_from_settings_builds_the_composer_a_user_gets(method):
    settings = Settings(enabled=True, recenter=0.3, temperature_scale=4.0, patch_size=1, top_k=2, probe_every=3,
                        composition_map=True, method=method)
    comp = Composer.from_settings(["a", "b", "c"], settings)
    assert (comp.recenter, comp.temperature_scale, comp.patch_size, comp.top_k) == (0.3, 4.0, 1, 2)
    assert comp.policy.probe_every == 3 and comp.record_map and comp.method == method
    base_c, lora_c, base_u, lora_u, _ = preds(n=3, b=1)
    merged = dict(merged_cond=merged_of(base_c, lora_c), merged_uncond=merged_of(base_u, lora_u, 1))
    assert comp.needs_merged([0, 1, 2]) == ("joint" in method_options(method)) and not comp.needs_merged([1])
    res = comp.fuse(step=2, active=[0, 1, 2], base_cond=base_c, lora_cond=lora_c, base_uncond=base_u,
                    lora_uncond=lora_u, **merged)
    ref = compose(base_c, lora_c, base_u, lora_u, step=2, recenter=0.3, temperature_scale=4.0, patch_size=1,
                  top_k=2, **method_options(method), **(merged if comp.needs_merged([0, 1, 2]) else {}))
    assert torch.allclose(res.cond, ref.cond) and torch.allclose(res.uncond, ref.uncond)


def test_paper_method_through_the_composer_is_the_papers_step():
    base_c, lora_c, base_u, lora_u, _ = preds(n=2, b=1)
    comp = Composer.from_settings(["a", "b"], Settings(enabled=True, method="paper", recenter=0.5))
    res = comp.fuse(step=3, active=[0, 1], base_cond=base_c, lora_cond=lora_c, base_uncond=base_u,
                    lora_uncond=lora_u)
    ref = compose(base_c, lora_c, base_u, lora_u, step=3)
    assert torch.equal(res.cond, ref.cond) and torch.equal(res.uncond, ref.uncond)


def _two_loras(d0, d1, h=2, w=2):
    base = torch.zeros(1, 2, h, w, dtype=torch.float64)
    lora = torch.stack([base + d0, base + d1])
    return base, lora


def test_resolve_keeps_compatible_differences_and_settles_conflicts():
    # LoRA 0 changes channel 0, LoRA 1 channel 1: compatible, both act in full (as in a merge)
    e0 = torch.tensor([1.0, 0.0], dtype=torch.float64)[None, :, None, None]
    e1 = torch.tensor([0.0, 1.0], dtype=torch.float64)[None, :, None, None]
    base, lora = _two_loras(e0, e1)
    res = compose(base, lora, base, lora, step=5, recenter=1.0, mix="resolve")
    assert torch.allclose(res.weights, torch.ones_like(res.weights))
    assert torch.allclose(res.cond, base + e0 + e1)
    # opposite pushes on the same patch: the LoRA that owns the patch keeps its change there
    base = torch.zeros(1, 2, 4, 4, dtype=torch.float64)
    local = base.clone()
    local[..., :2, :2] = 2 * e0  # LoRA 0: a local change in the top-left patch
    lora = torch.stack([local, base - e0])  # LoRA 1: the opposite push everywhere
    res = compose(base, lora, base, lora, step=5, recenter=1.0, mix="resolve", descriptor="activity")
    assert torch.allclose(res.weights[0], torch.ones_like(res.weights[0]))
    assert res.weights[1, ..., :2, :2].max() < 1e-6  # the loser yields where they conflict ...
    assert torch.allclose(res.weights[1, ..., 2:], torch.ones_like(res.weights[1, ..., 2:]))  # ... only there
    assert torch.allclose(res.cond[..., :2, :2], local[..., :2, :2], atol=1e-6)
    # at the first step (infinite temperature) a full conflict halves both
    first = compose(base, lora, base, lora, step=0, recenter=1.0, mix="resolve", descriptor="activity")
    assert torch.allclose(first.weights[..., :2, :2], torch.full_like(first.weights[..., :2, :2], 0.5))


def test_resolve_tests_conflicts_per_pixel_not_per_patch():
    # In the left 2x2 patch the two LoRAs push pixel (0, 0) opposite ways and pixel (0, 1) the same way.
    # Summed over the patch the pushes cancel (cosine 0: no conflict); per pixel, (0, 0) is a conflict and
    # (0, 1) an agreement, and only (0, 0) is settled. LoRA 1 also changes the right patch, so LoRA 0 owns
    # the left one.
    e0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
    base = torch.zeros(1, 2, 2, 4, dtype=torch.float64)
    a, b = base.clone(), base.clone()
    a[0, :, 0, 0], b[0, :, 0, 0] = 2 * e0, -e0
    a[0, :, 0, 1], b[0, :, 0, 1] = e0, 2 * e0
    b[0, :, :, 2:] = 3 * e0[:, None, None]
    lora = torch.stack([a, b])
    res = compose(base, lora, base, lora, step=5, recenter=1.0, mix="resolve", descriptor="activity")
    gates = res.weights[:, 0, 0]  # [N, H, W]
    assert gates[0, 0, 0] == 1 and gates[1, 0, 0] < 0.1  # the patch's owner keeps the conflicting pixel
    assert torch.allclose(res.cond[0, :, 0, 0], 2 * e0, atol=0.1)
    assert torch.allclose(gates[:, 0, 1], torch.ones(2, dtype=gates.dtype))  # both act in full where they agree
    assert torch.allclose(res.cond[0, :, 0, 1], 3 * e0)
    assert torch.allclose(gates[..., 1:, :], torch.ones_like(gates[..., 1:, :]))  # no conflict: no change
    assert torch.allclose(gates[..., :, 2:], torch.ones_like(gates[..., :, 2:]))
    # tested per patch (the comparison option), the two pushes cancel and nothing is settled
    per_patch = compose(base, lora, base, lora, step=5, recenter=1.0, mix="resolve", descriptor="activity",
                        conflict="patch")
    assert torch.allclose(per_patch.weights, torch.ones_like(per_patch.weights))
    with pytest.raises(ValueError, match="conflict"):
        compose(base, lora, base, lora, step=5, recenter=1.0, mix="resolve", conflict="window")


@pytest.mark.parametrize("x_form", [False, True])
def test_one_lora_through_the_default_method_is_that_lora(x_form):
    # with nothing to conflict with, the default's step is the LoRA's own prediction, negative included
    base_c, lora_c, base_u, lora_u, x = preds(n=1)
    comp = Composer.from_settings(["only"], Settings(enabled=True))
    for step in (0, 3, 9):
        res = comp.fuse(step=step, active=[0], base_cond=base_c, lora_cond=lora_c, base_uncond=base_u,
                        lora_uncond=lora_u, x=x if x_form else None)
        assert torch.allclose(res.cond, lora_c[0]) and torch.allclose(res.uncond, lora_u[0])


def test_joint_is_the_average_of_the_branch_composition_and_the_merged_prediction():
    base_c, lora_c, base_u, lora_u, _ = preds(n=3, b=2)
    m_c, m_u = merged_of(base_c, lora_c), merged_of(base_u, lora_u, 1)
    plain = compose(base_c, lora_c, base_u, lora_u, step=3, recenter=1.0, **method_options("resolve"))
    res = compose(base_c, lora_c, base_u, lora_u, step=3, recenter=1.0, **method_options("joint"),
                  merged_cond=m_c, merged_uncond=m_u)
    gated_out = ((1 - plain.weights) * (lora_c - base_c)).sum(0)
    assert torch.allclose(res.cond, 0.5 * plain.cond + 0.5 * (m_c - gated_out))
    gated_out_u = ((1 - plain.weights) * (lora_u - base_u)).sum(0)
    assert torch.allclose(res.uncond, 0.5 * plain.uncond + 0.5 * (m_u - gated_out_u))
    assert torch.equal(res.weights, plain.weights)
    # one LoRA: the merged row is that LoRA, nothing to add, and the result is its own prediction
    one = compose(base_c, lora_c[:1], base_u, lora_u[:1], step=3, recenter=1.0, **method_options("joint"))
    assert torch.allclose(one.cond, lora_c[0]) and torch.allclose(one.uncond, lora_u[0])
    with pytest.raises(ValueError, match="needs merged_cond"):
        compose(base_c, lora_c, step=3, recenter=0.0, **method_options("joint"))
    with pytest.raises(ValueError, match="needs merged_uncond"):
        compose(base_c, lora_c, base_u, lora_u, step=3, **method_options("joint"), merged_cond=m_c)
    with pytest.raises(ValueError, match="delta mix"):
        compose(base_c, lora_c, step=3, recenter=0.0, joint=0.5, merged_cond=m_c)


def test_composer_leaves_the_merged_row_out_when_a_branch_is_dropped():
    base_c, lora_c, base_u, lora_u, _ = preds(n=3, b=1)
    m_c, m_u = merged_of(base_c, lora_c), merged_of(base_u, lora_u, 1)
    comp = Composer.from_settings(["a", "b", "c"], Settings(enabled=True, method="joint", recenter=1.0))
    with pytest.raises(ValueError, match="needs the merged row"):
        comp.fuse(step=1, active=[0, 1, 2], base_cond=base_c, lora_cond=lora_c, base_uncond=base_u,
                  lora_uncond=lora_u)
    broken = lora_c.clone()
    broken[2] = float("nan")
    res = comp.fuse(step=1, active=[0, 1, 2], base_cond=base_c, lora_cond=broken, base_uncond=base_u,
                    lora_uncond=lora_u, merged_cond=m_c, merged_uncond=m_u)
    ref = compose(base_c, lora_c[:2], base_u, lora_u[:2], step=1, recenter=1.0, **method_options("resolve"))
    assert torch.allclose(res.cond, ref.cond) and comp.dropped["c"] == 1
    nan_merged = comp.fuse(step=1, active=[0, 1, 2], base_cond=base_c, lora_cond=lora_c, base_uncond=base_u,
                           lora_uncond=lora_u, merged_cond=m_c * float("nan"), merged_uncond=m_u)
    ref = compose(base_c, lora_c, base_u, lora_u, step=1, recenter=1.0, **method_options("resolve"))
    assert torch.allclose(nan_merged.cond, ref.cond)
