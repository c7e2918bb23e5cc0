"""Smoke test of the quality benchmark: the smallest configuration end to end, plus its building blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from bench import quality
from bench.quality_methods import Method, default_methods, sample
from bench.quality_model import LoRATrainer, TinyUNet, load_kohya, lora_targets, save_kohya
from bench.quality_report import default_name
from bench.quality_world import (
    CONCEPT_LIST,
    HEADS,
    VOCAB,
    caption,
    compositions,
    labels_of,
    render,
    two_subject_compositions,
    two_subject_labels,
)


def test_world_compositions_follow_composlora():
    comps = compositions()
    assert [sum(len(c) == n for c in comps) for n in range(2, 6)] == [24, 72, 96, 48]
    for comp in comps:
        cats = [c[0] for c in comp]
        assert cats[0] == "character" and len(set(cats)) == len(cats)
    assert len(CONCEPT_LIST) == 11
    img = render(labels_of(comps[-1]), np.random.default_rng(0))
    assert img.shape == (3, 16, 16) and img.dtype == np.float32 and img.min() >= 0 and img.max() <= 1


def test_two_subject_set_asks_for_two_different_characters():
    sets = two_subject_compositions()
    assert len(sets) == 27
    for comp in sets:
        chars = [c for c in comp if c[0] == "character"]
        assert len(chars) == 2 and chars[0] != chars[1]
        labels = two_subject_labels(comp)
        assert labels.pair and {labels.values[0], labels.values[5] - 1} == {c[1] for c in chars}
    # a pair scene differs from the single-figure scene of the same labels
    rng = np.random.default_rng(0)
    single = render(labels_of(sets[0][:1]), rng)
    pair = render(two_subject_labels(sets[0]), rng)
    assert np.abs(single - pair).max() > 0.2
    assert caption(sets[0], pair=True)[0] != caption(sets[0])[0]


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
                               steps=3, cfg=3.0)  # the paper's step
    assert imgs.shape == (2, 3, 16, 16) and imgs.min() >= 0 and imgs.max() <= 1
    assert maps.shape == (3, 2, 16, 16)
    assert torch.allclose(maps.sum(0), torch.ones(2, 16, 16), atol=1e-5)
    assert evals.tolist() == [8.0, 8.0]
    # the user's composer (Settings, method paper, no selection) computes the same step as compose
    imgs_e, maps_e, evals_e = sample(Method("e", "engine", method="paper"), model, targets, loras, branches, tokens,
                                     noise, steps=3, cfg=3.0)
    assert torch.allclose(imgs_e, imgs, atol=1e-5) and torch.allclose(maps_e, maps, atol=1e-5)
    assert evals_e.tolist() == [8.0, 8.0]
    assert maps.amax() > 0.5  # the random LoRAs differ from the base, so weights are not uniform
    # selection: top-1 kept between probes every 2 steps -> (8 + 4 + 8 + 4) / 4 evaluations per step
    imgs_s, _, evals_s = sample(Method("s", "engine", top_k=1, probe_every=2), model, targets, loras, branches,
                                tokens, noise, steps=4, cfg=3.0)
    assert evals_s.tolist() == [6.0, 6.0] and imgs_s.shape == imgs.shape


def test_smoke_run_writes_a_sane_report(tmp_path):
    summary = quality.run(quality.CONFIGS["smoke"], tmp_path / "cache", tmp_path / "out", log=lambda *_: None)
    judge = summary["seeds"][0]["judge"]
    assert 0.0 <= judge["mean"] <= 1.0 and 0.0 <= judge["all"] <= 1.0
    assert len(judge["per_category"]) == len(HEADS)
    names = [m.name for m in default_methods()]
    assert list(summary["results"]) == names
    assert default_name(summary["default_method"]) in names and "merge" in names and "loratorio paper" in names
    n_comps = len(summary["compositions"])
    assert n_comps == 4
    for res in summary["results"].values():
        assert len(res["recall_per_comp"]) == n_comps
        assert 0.0 <= res["recall_avg"] <= 1.0 and 0.0 <= res["spurious"] <= 1.0
        assert sorted(res["recall_by_n"]) == [2, 3, 4, 5]
        assert len(res["subjects_per_comp"]) == len(summary["two_subject_compositions"]) == 27
        assert 0.0 <= res["two_subject"] <= 1.0
    assert summary["results"]["loratorio paper"]["evals_by_n"] == {2: 6, 3: 8, 4: 10, 5: 12}
    report = (tmp_path / "out" / "quality.md").read_text()
    for name in names:
        assert f"| {name} |" in report
    assert (tmp_path / "out" / "images" / "quality_grid.png").stat().st_size > 1000
    assert (tmp_path / "out" / "images" / "quality_two_subjects.png").stat().st_size > 1000
    as_json = quality.json_summary(summary)
    assert as_json["default_method"] == summary["default_method"]
    for name in names:
        entry = as_json["methods"][name]
        assert set(entry) >= {"recall_by_n", "recall_avg", "fd", "two_subject"}
        assert sorted(entry["recall_by_n"]) == ["2", "3", "4", "5"]
    # a rerun finds everything in the cache
    messages = []
    again = quality.run(quality.CONFIGS["smoke"], tmp_path / "cache", None, log=messages.append)
    assert messages == []
    assert again["results"]["merge"]["recall_per_comp"] == summary["results"]["merge"]["recall_per_comp"]
