"""Smoke test of the quality benchmark: the smallest configuration end to end, plus its building blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import quality
from bench.quality_methods import Method, default_methods, sample
from bench.quality_model import LoRATrainer, TinyUNet, load_kohya, lora_targets, save_kohya
from bench.quality_world import CATEGORIES, CONCEPT_LIST, VOCAB, caption, compositions, labels_of, render


def test_world_compositions_follow_composlora():
    comps = compositions()
    assert [sum(len(c) == n for c in comps) for n in range(2, 6)] == [24, 72, 96, 48]
    for comp in comps:
        cats = [c[0] for c in comp]
        assert cats[0] == "character" and len(set(cats)) == len(cats)
    assert len(CONCEPT_LIST) == 11
    img = render(labels_of(comps[-1]), np.random.default_rng(0))
    assert img.shape == (3, 16, 16) and img.dtype == np.float32 and img.min() >= 0 and img.max() <= 1


def test_kohya_roundtrip_and_merge_equals_routed_sum(tmp_path):
    torch.manual_seed(0)
    model = TinyUNet(VOCAB).eval()
    targets = lora_targets(model)
    sets = []
    for i in range(2):
        trainer = LoRATrainer(targets)
        for p in trainer.params:
            torch.nn.init.normal_(p.up, std=0.05)
        save_kohya(tmp_path / f"l{i}.safetensors", trainer.state())
        sets.append(load_kohya(tmp_path / f"l{i}.safetensors", targets))
    name = next(n for n, m in targets.items() if isinstance(m, torch.nn.Linear))
    assert sets[0][name].scale == pytest.approx(1.0)  # alpha = rank
    x, t = torch.randn(1, 3, 16, 16), torch.tensor([500])
    tokens = torch.tensor([caption([CONCEPT_LIST[0], CONCEPT_LIST[3]])])
    from loratorio.lora import delta_weight
    from loratorio.routing import Router

    merged = {n: [s[n] for s in sets] for n in targets}
    with torch.no_grad(), Router(targets, [merged]).route([slice(0, None)]):
        routed_out = model(x, t, tokens)
    with torch.no_grad():
        saved = {n: m.weight.clone() for n, m in targets.items()}
        for n, m in targets.items():
            m.weight += delta_weight(merged[n], m.weight.shape)
        merged_out = model(x, t, tokens)
        for n, m in targets.items():
            m.weight.copy_(saved[n])
    assert routed_out.shape == (1, 3, 16, 16)
    assert torch.allclose(routed_out, merged_out, atol=1e-4)
    assert (routed_out - model(x, t, tokens)).abs().max() > 1e-3  # the LoRAs do something


def test_loratorio_maps_are_weights(tmp_path):
    torch.manual_seed(0)
    model = TinyUNet(VOCAB).eval()
    targets = lora_targets(model)
    loras = []
    for _ in CONCEPT_LIST:
        trainer = LoRATrainer(targets)
        for p in trainer.params:
            torch.nn.init.normal_(p.up, std=0.05)
        save_kohya(tmp_path / "l.safetensors", trainer.state())
        loras.append(load_kohya(tmp_path / "l.safetensors", targets))
    comps = [c for c in compositions() if len(c) == 3][:2]
    branches = [[CONCEPT_LIST.index(c) for c in comp] for comp in comps]
    tokens = torch.tensor([caption(c) for c in comps])
    noise = torch.randn(2, 3, 16, 16)
    imgs, maps, evals = sample(Method("lt", "loratorio"), model, targets, loras, branches, tokens, noise,
                               steps=3, cfg=3.0)
    assert imgs.shape == (2, 3, 16, 16) and imgs.min() >= 0 and imgs.max() <= 1
    assert maps.shape == (3, 2, 16, 16)
    assert torch.allclose(maps.sum(0), torch.ones(2, 16, 16), atol=1e-5)
    assert evals.tolist() == [8.0, 8.0]
    # the engine's Composer with no selection computes the same step as compose
    imgs_e, maps_e, evals_e = sample(Method("e", "engine"), model, targets, loras, branches, tokens, noise,
                                     steps=3, cfg=3.0)
    assert torch.allclose(imgs_e, imgs, atol=1e-5) and torch.allclose(maps_e, maps, atol=1e-5)
    assert evals_e.tolist() == [8.0, 8.0]
    assert maps.amax() > 0.5  # the random LoRAs differ from the base, so weights are not uniform
    # selection: top-1 kept between probes every 2 steps -> (8 + 4 + 8 + 4) / 4 evaluations per step
    imgs_s, _, evals_s = sample(Method("s", "engine", top_k=1, probe_every=2), model, targets, loras, branches,
                                tokens, noise, steps=4, cfg=3.0)
    assert evals_s.tolist() == [6.0, 6.0] and imgs_s.shape == imgs.shape


def test_smoke_run_writes_a_sane_report(tmp_path):
    summary = quality.run(quality.CONFIGS["smoke"], tmp_path / "cache", tmp_path / "out", log=lambda *_: None)
    judge = summary["judge"]
    assert 0.0 <= judge["mean"] <= 1.0 and 0.0 <= judge["all"] <= 1.0
    assert len(judge["per_category"]) == len(CATEGORIES)
    names = [m.name for m in default_methods()]
    assert list(summary["results"]) == names
    n_comps = len(summary["compositions"])
    assert n_comps == 4
    for res in summary["results"].values():
        assert len(res["recall_per_comp"]) == n_comps
        assert 0.0 <= res["recall_avg"] <= 1.0 and 0.0 <= res["spurious"] <= 1.0
        assert 0.0 < res["confidence"] <= 1.0
        assert sorted(res["recall_by_n"]) == [2, 3, 4, 5]
    assert summary["results"]["loratorio (default)"]["evals_by_n"] == {2: 6, 3: 8, 4: 10, 5: 12}
    assert summary["results"]["loratorio lambda=0"]["evals_by_n"] == {2: 4, 3: 5, 4: 6, 5: 7}
    assert summary["results"]["composite"]["evals_by_n"][5] == 10
    report = (tmp_path / "out" / "quality.md").read_text()
    for name in names:
        assert f"| {name} |" in report
    assert (tmp_path / "out" / "images" / "quality_grid.png").stat().st_size > 1000
    # a rerun finds everything in the cache
    messages = []
    again = quality.run(quality.CONFIGS["smoke"], tmp_path / "cache", None, log=messages.append)
    assert messages == []
    assert again["results"]["merge"]["recall_per_comp"] == summary["results"]["merge"]["recall_per_comp"]
