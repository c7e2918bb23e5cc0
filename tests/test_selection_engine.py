"""Selection policy and the per-generation composer."""

import pytest
import torch

from loratorio.engine import Composer
from loratorio.fusion import compose
from loratorio.selection import ProbePolicy


def weights_with_mass(masses):
    return torch.tensor(masses, dtype=torch.float32).view(-1, 1, 1, 1, 1).expand(-1, 1, 1, 2, 2)


def test_probe_every_one_evaluates_all():
    policy = ProbePolicy(8, top_k=2, probe_every=1)
    for step in range(10):
        assert policy.active(step) == list(range(8))
        policy.observe(step, list(range(8)), weights_with_mass(range(8)))


def test_probe_every_r_keeps_the_heaviest_between_probes():
    policy = ProbePolicy(8, top_k=2, probe_every=5)
    counts = []
    for step in range(20):
        active = policy.active(step)
        counts.append(len(active))
        masses = [0.0] * 8
        masses[6], masses[3] = 0.5, 0.3  # LoRAs 6 and 3 win every probe
        policy.observe(step, active, weights_with_mass([masses[i] for i in active]))
        if step % 5:
            assert active == [3, 6]
    assert counts == [8, 2, 2, 2, 2] * 4
    policy.reset()
    assert policy.active(3) == list(range(8))  # a new pass starts with a probe


def test_policy_without_top_k_never_prunes():
    policy = ProbePolicy(4, top_k=0, probe_every=5)
    policy.observe(0, [0, 1, 2, 3], weights_with_mass([1, 0, 0, 0]))
    assert policy.active(1) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="probe_every"):
        ProbePolicy(3, probe_every=0)


def branch_preds(n=3, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g) for s in ((b, 4, 8, 8), (n, b, 4, 8, 8), (b, 4, 8, 8), (n, b, 4, 8, 8))]


def test_composer_equals_compose_and_records_map():
    base_c, lora_c, base_u, lora_u = branch_preds()
    comp = Composer(["a", "b", "c"], record_map=True, top_k=2)
    for step in range(3):
        res = comp.fuse(step=step, active=comp.active(step), base_cond=base_c, lora_cond=lora_c,
                        base_uncond=base_u, lora_uncond=lora_u)
        ref = compose(base_c, lora_c, base_u, lora_u, step=step, top_k=2)
        torch.testing.assert_close(res.cond, ref.cond)
        torch.testing.assert_close(res.uncond, ref.uncond)
        torch.testing.assert_close(res.weights, ref.weights)
    mean = comp.mean_weights()
    assert mean.shape == (3, 2, 8, 8)
    torch.testing.assert_close(mean.sum(0), torch.ones(2, 8, 8))


def test_composer_drops_non_finite_branches():
    base_c, lora_c, base_u, lora_u = branch_preds()
    lora_u[1, 0, 0, 0, 0] = float("nan")
    comp = Composer(["a", "b", "c"])
    res = comp.fuse(step=4, active=[0, 1, 2], base_cond=base_c, lora_cond=lora_c, base_uncond=base_u,
                    lora_uncond=lora_u)
    ref = compose(base_c, lora_c[[0, 2]], base_u, lora_u[[0, 2]], step=4)
    torch.testing.assert_close(res.cond, ref.cond)
    assert torch.isfinite(res.uncond).all()
    assert (res.weights[1] == 0).all()
    assert comp.dropped == {"b": 1}
    lora_c[:] = float("inf")
    res = comp.fuse(step=5, active=[0, 1, 2], base_cond=base_c, lora_cond=lora_c, base_uncond=base_u,
                    lora_uncond=lora_u)
    assert res.cond is base_c and res.uncond is base_u


def test_composer_without_uncond_and_recenter_zero():
    base_c, lora_c, base_u, _ = branch_preds()
    comp = Composer(["a", "b", "c"], recenter=0.0)
    assert not comp.needs_uncond
    res = comp.fuse(step=2, active=[0, 1, 2], base_cond=base_c, lora_cond=lora_c, base_uncond=base_u)
    assert res.uncond is base_u
    comp = Composer(["a", "b", "c"])  # guidance-distilled: no uncond at all
    res = comp.fuse(step=2, active=[0, 1, 2], base_cond=base_c, lora_cond=lora_c)
    assert res.uncond is None


def test_composer_subset_weights_scatter_to_all_branches():
    base_c, lora_c, base_u, lora_u = branch_preds(n=4)
    comp = Composer(list("abcd"), top_k=2, probe_every=3)
    comp.fuse(step=0, active=comp.active(0), base_cond=base_c, lora_cond=lora_c, base_uncond=base_u,
              lora_uncond=lora_u)
    active = comp.active(1)
    assert len(active) == 2
    res = comp.fuse(step=1, active=active, base_cond=base_c, lora_cond=lora_c[active], base_uncond=base_u,
                    lora_uncond=lora_u[active])
    others = [i for i in range(4) if i not in active]
    assert (res.weights[others] == 0).all()
    torch.testing.assert_close(res.weights.sum(0), torch.ones_like(res.weights[0]))


def test_composer_does_not_blame_branches_when_the_base_itself_is_not_finite():
    base_c, lora_c, base_u, lora_u = branch_preds()
    base_u[0, 0, 0, 0] = float("inf")
    comp = Composer(["a", "b", "c"])
    res = comp.fuse(step=3, active=[0, 1, 2], base_cond=base_c, lora_cond=lora_c, base_uncond=base_u,
                    lora_uncond=lora_u)
    assert res.cond is base_c and res.uncond is base_u
    assert (res.weights == 0).all()
    assert comp.base_nonfinite == 1 and not comp.dropped
    res = comp.fuse(step=4, active=[0, 1, 2], base_cond=base_c, lora_cond=lora_c)  # no uncond: cond alone counts
    assert res.cond is not base_c and comp.base_nonfinite == 1
