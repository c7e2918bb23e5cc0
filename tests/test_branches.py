"""Host-neutral glue: branch planning, the adapter cache, row layout, fit checks, state reporting."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from loratorio import generation, loading, lora
from loratorio.lora import Dense, LowRank, OutputSlice, delta_weight
from loratorio.settings import Settings


def lr(out_f=4, in_f=3, r=2, scale=0.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return LowRank(torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g), scale)


def test_plan_branches_rules():
    settings = Settings(enabled=True, pool=["p1", "a"], merge_into_base=["m", "absent"])
    plan = loading.plan_branches("x <lora:a:0.5> <lora:m> <lora:z:0> <lora:b:0:1> <lora:a> <lora:bad:x>", settings)
    assert [(b.name, b.te, b.unet, b.source) for b in plan.branches] == [
        ("a", 0.5, 0.5, "prompt"), ("b", 0.0, 1.0, "prompt"), ("p1", 1.0, 1.0, "pool")]
    assert plan.merged == ["m"]
    assert plan.skipped["z"] == loading.Reason.ZERO
    assert plan.skipped["<lora:a>"] == loading.Reason.DUPLICATE  # the first tag is composed, the second reported
    assert "a" not in plan.skipped
    assert "merge into base" in plan.skipped["absent"]
    assert "not a number" in plan.skipped["<lora:bad:x>"]


def test_plan_calls_and_rows():
    assert generation.plan_calls([2, 2, 2], 0) == [[(0, 0, 2), (1, 0, 2), (2, 0, 2)]]
    calls = generation.plan_calls([3, 0, 2], 2)
    assert calls == [[(0, 0, 2)], [(0, 2, 3), (2, 0, 1)], [(2, 1, 2)]]
    assert all(sum(b - a for _, a, b in c) <= 2 for c in calls)
    assert generation.call_rows(calls[1], 3) == [slice(0, 1), None, slice(1, 2)]
    # blocks 0 and 1 belong to adapter 0 (its cond and uncond rows): one slice
    assert generation.call_rows([(0, 0, 2), (1, 0, 2), (2, 0, 1)], 2, owner=[0, 0, 1]) == [slice(0, 4), slice(4, 5)]
    with pytest.raises(ValueError, match="not contiguous"):
        generation.call_rows([(0, 0, 1), (1, 0, 1), (2, 0, 1)], 2, owner=[0, 1, 0])
    with pytest.raises(ValueError):
        generation.plan_calls([1], -1)


def test_scaled_set_and_truncate_rank_share_tensors():
    piece = lr(r=4)
    dense = Dense(torch.ones(2, 3), 2.0, bias=torch.ones(2))
    packed = OutputSlice(lr(out_f=2), 2, 2)
    scaled = lora.scaled_set({"a": piece, "b": [dense, packed]}, 0.5)
    assert scaled["a"].scale == 0.25 and scaled["a"].down is piece.down and piece.scale == 0.5
    assert scaled["b"][0].scale == 1.0 and torch.equal(scaled["b"][0].bias, torch.full((2,), 0.5))
    assert scaled["b"][1].inner.scale == 0.25 and scaled["b"][1].offset == 2
    cut = lora.truncate_rank({"a": piece}, 2)["a"]
    assert cut.rank == 2 and cut.scale == piece.scale
    torch.testing.assert_close(cut.delta(), piece.scale * piece.up[:, :2] @ piece.down[:2])


def test_check_fit():
    targets = {"lin": nn.Linear(3, 4), "conv": nn.Conv2d(3, 4, 3), "mha": nn.MultiheadAttention(4, 1)}
    assert lora.check_fit({"lin": lr()}, targets) is None
    assert "[5, 3] for a [4, 3]" in lora.check_fit({"lin": lr(out_f=5)}, targets)
    conv_piece = LowRank(torch.randn(2, 3, 1, 1), torch.randn(4, 2, 1, 1))
    assert "kernel (1, 1) for a (3, 3)" in lora.check_fit({"conv": conv_piece}, targets)
    assert "not in this model" in lora.check_fit({"nope": lr()}, targets)
    q = OutputSlice(lr(out_f=4, in_f=4), 4, 4)
    assert lora.check_fit({"mha": q}, targets, packed=True) is None
    assert "beyond 12" in lora.check_fit({"mha": OutputSlice(lr(out_f=4, in_f=4), 10, 4)}, targets, packed=True)


def _loaded(nbytes: int) -> loading.LoadedLora:
    return loading.LoadedLora(unet={"m": Dense(torch.zeros(nbytes // 16, 4))})  # 4 float32 per row


def test_cache_bound_eviction_replacement_and_model_change(tmp_path):
    files = []
    for i in range(3):
        path = tmp_path / f"{i}.safetensors"
        path.write_bytes(b"x" * (i + 1))
        files.append(loading.LoraFile.at(str(i), str(path)))
    loads = []

    def loader(f):
        loads.append(f.name)
        return _loaded(400 * 1024)  # 400 KiB each

    cache = loading.AdapterCache(max_mb=1.0)
    cache.use_model("m1")
    cache.get(files[0], loader)
    cache.get(files[1], loader)
    cache.get(files[0], loader)
    assert loads == ["0", "1"]
    cache.get(files[2], loader)  # 1.2 MB > 1 MB: the least recently used ("1") goes
    assert files[1] not in cache and files[0] in cache and files[2] in cache
    assert cache.nbytes <= 2**20
    # a replaced file is a new key and the stale entry is dropped
    path = files[0].path
    with open(path, "wb") as f:
        f.write(b"changed content")
    os.utime(path, ns=(1, 5_000_000_000))
    replaced = loading.LoraFile.at("0", path)
    assert replaced.key != files[0].key
    cache.get(replaced, loader)
    assert loads[-1] == "0" and files[0] not in cache
    cache.use_model("m1")
    assert len(cache) == 2
    cache.use_model("m2")
    assert len(cache) == 0
    too_big = loading.AdapterCache(max_mb=0)
    too_big.get(files[2], loader)
    assert len(too_big) == 0


class Bridge(loading.HostBridge):
    def __init__(self, files, targets):
        self.files, self.targets, self.loads = files, targets, []

    def model_key(self):
        return "model"

    def find_lora(self, name):
        path = self.files.get(name)
        return None if path is None else loading.LoraFile(name, path)

    def available_loras(self):
        return sorted(self.files)

    def load_lora(self, lora_file):
        self.loads.append(lora_file.name)
        if lora_file.name == "boom":
            raise OSError("truncated file")
        if lora_file.name == "empty":
            return loading.LoadedLora()
        if lora_file.name == "nan":
            return loading.LoadedLora(unet={"lin": LowRank(torch.full((2, 3), float("nan")), torch.ones(4, 2))})
        if lora_file.name == "wide":
            return loading.LoadedLora(unet={"lin": lr(out_f=9)})
        if lora_file.name == "flaky" and self.loads.count("flaky") == 1:
            raise OSError("file busy")
        if lora_file.name in ("most", "few"):
            unmatched = 2 if lora_file.name == "most" else 3
            return loading.LoadedLora(unet={"lin": lr(seed=4)}, layers=4, unmatched=unmatched)
        return loading.LoadedLora(unet={"lin": lr(seed=len(lora_file.name))}, te={"te": lr(seed=1)})

    def unet_targets(self):
        return {"lin": self.targets["lin"]}

    def te_targets(self):
        return {"te": self.targets["te"]}


def test_generation_state_loads_reports_and_writes_infotext():
    targets = {"lin": nn.Linear(3, 4), "te": nn.Linear(3, 4)}
    files = {n: f"/loras/{n}.safetensors" for n in ("good", "boom", "empty", "nan", "wide", "alias")}
    files["alias"] = files["good"]
    bridge = Bridge(files, targets)
    settings = Settings(enabled=True, pool=["wide"])
    state = generation.GenerationState(settings)
    prompt = "<lora:good:0.5:0.25> <lora:boom> <lora:empty> <lora:nan> <lora:ghost> <lora:alias>"
    changed = state.load(prompt, bridge, loading.AdapterCache(10))
    assert changed and state.names == ["good"]
    good = state.branches[0]
    assert good.unet["lin"].scale == pytest.approx(0.5 * 0.25) and good.te["te"].scale == pytest.approx(0.5 * 0.5)
    skipped = state.skipped
    assert "truncated file" in skipped["boom"] and "could not be loaded" in skipped["boom"]
    assert skipped["empty"] == loading.Reason.NO_MATCH
    assert skipped["nan"] == loading.Reason.NON_FINITE
    assert skipped["ghost"] == loading.Reason.NOT_FOUND
    assert "same file as good" in skipped["alias"]
    assert "does not fit" in skipped["wide"]
    assert state.handled_names >= {"good", "boom", "ghost", "alias"}
    assert not state.load(prompt, bridge, loading.AdapterCache(10))  # same branches: no router rebuild needed
    info = state.infotext()
    assert info["LoRAtorio LoRAs"] == "good"
    assert "ghost: not found" in info["LoRAtorio skipped"]
    assert "composing 1 LoRA(s): good" in state.report()
    state.refuse("a refiner is set")
    assert "LoRAtorio LoRAs" not in state.infotext()
    assert "not applied: a refiner is set" in state.infotext()["LoRAtorio note"]


def test_state_composer_and_map_rows():
    state = generation.GenerationState(Settings(enabled=True, composition_map=True, method="paper"))
    state.branches = [loading.Branch(loading.BranchSpec(n), loading.LoraFile(n, n), {}, {}, {}) for n in ("a", "b")]
    composer = state.new_composer()
    base = torch.randn(3, 4, 4, 4)
    lora = torch.randn(2, 3, 4, 4, 4)
    composer.fuse(step=1, active=[0, 1], base_cond=base, lora_cond=lora)
    state.record_map(rows=[0, 2])
    assert len(state.maps) == 2 and state.maps[0][0].shape == (2, 4, 4) and state.maps[1][1] == ["a", "b"]
    torch.testing.assert_close(state.maps[0][0].sum(0), torch.ones(4, 4))


def test_delta_of_scaled_set_is_linear_in_the_multiplier():
    piece = lr(seed=3)
    full = delta_weight(piece, (4, 3))
    torch.testing.assert_close(delta_weight(lora.scaled_set({"m": piece}, -0.7)["m"], (4, 3)), -0.7 * full)


def test_each_lora_keeps_the_outcome_of_the_latest_batch():
    targets = {"lin": nn.Linear(3, 4), "te": nn.Linear(3, 4)}
    bridge = Bridge({n: f"/loras/{n}.safetensors" for n in ("good", "flaky")}, targets)
    state = generation.GenerationState(Settings(enabled=True))
    state.load("<lora:good> <lora:flaky>", bridge, None)  # batch 1: flaky fails to load
    assert state.names == ["good"]
    assert state.skipped == {"flaky": "could not be loaded (file busy)"}
    state.load("<lora:good> <lora:flaky>", bridge, None)  # batch 2: it loads
    assert state.names == ["good", "flaky"]
    assert state.skipped == {}
    info = state.infotext()
    assert info["LoRAtorio LoRAs"] == "good, flaky"
    assert "LoRAtorio skipped" not in info
    assert state.report() == "LoRAtorio: composing 2 LoRA(s): good, flaky"
    state.load("<lora:good> <lora:ghost>", bridge, None)  # batch 3: another LoRA's reason is added
    assert state.skipped == {"ghost": loading.Reason.NOT_FOUND}


def test_lora_matching_part_of_the_model_is_composed_with_a_note_or_skipped_below_half():
    targets = {"lin": nn.Linear(3, 4), "te": nn.Linear(3, 4)}
    bridge = Bridge({n: f"/loras/{n}.safetensors" for n in ("most", "few")}, targets)
    state = generation.GenerationState(Settings(enabled=True))
    state.load("<lora:most> <lora:few>", bridge, None)
    assert state.names == ["most"]
    assert state.skipped == {"few": "only 1 of its 4 layers match this model (a LoRA for another model version?)"}
    assert state.partial == {"most": "only 2 of its 4 layers match this model (a LoRA for another model version?)"}
    assert state.infotext()["LoRAtorio note"] == ("most: only 2 of its 4 layers match this model (a LoRA for another "
                                                  "model version?)")
    state.load("<lora:few>", bridge, None)  # most is not in this batch: its note stays with its images' batch
    assert state.names == [] and "most" not in state.infotext().get("LoRAtorio note", "")
