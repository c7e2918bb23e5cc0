"""The benchmark's smallest case runs end to end and reports a finite measured value per key.

Not a timing test: the toy model's timings mean nothing. It keeps ``bench/run.py`` from
rotting (API drift in the core, the docs writer, the plot).
"""

import json
import math

import pytest

from bench import _report
from bench.run import KEYS, main, run


@pytest.fixture(scope="module")
def result():
    return run(quick=True, smoke=True, log=lambda message: None)


def test_every_key_holds_a_finite_measured_value(result):
    for key in (*KEYS, "fusion_fraction"):
        assert isinstance(result[key], float), key
        assert math.isfinite(result[key]), key
        # a difference of two timings: in the smoke run's single repetition it can fall either side of zero
        assert result[key] > 0 or key == "hook_us_per_module", key
    assert result["mode"] == "smoke"


def test_one_model_call_per_step_through_both_fake_hosts(result):
    assert result["detail"]["model_calls"] == {"a1111": 1.0, "forge": 1.0}
    assert result["model_calls_per_step"] == 1.0 and result["targets"]["model_calls_per_step"]["met"]
    hook = result["detail"]["hook_cost"]
    assert hook["modules"] > 0 and hook["rows"] == 2 * 4 + 2
    alone = hook["alone"]
    assert alone["modules"] == hook["modules"] and alone["plain_us"] > 0
    assert alone["extra_us"] == pytest.approx(alone["dispatch_us"] + alone["work_us"])
    assert set(result["targets"]) == {*KEYS, "fusion_fraction"} - {"fusion_ms"}


def test_routed_rows_match_merged_weights_and_adapters_matter(result):
    error = result["detail"]["routing_error"]
    assert result["routing_max_rel_error"] < 1e-4
    assert len(error["per_lora"]) == 4
    # Each LoRA changes the output by far more than the routing error: the check is not vacuous.
    assert min(error["lora_effect_rel"]) > 100 * result["routing_max_rel_error"]


def test_memory_and_pruning_schedule_are_what_the_suite_claims(result):
    assert result["adapter_memory_ratio"] <= 2.0
    pruning = result["detail"]["pruning"]
    assert pruning["branches_per_step"]["all"] == [8] * 20
    assert pruning["branches_per_step"]["pruned"] == [8 if k % 5 == 0 else 2 for k in range(20)]
    assert pruning["evaluation_ratio"] == pytest.approx(168 / 360)
    flops = result["detail"]["flops"]
    assert 0 < flops["adapter_share_of_unet"] < flops["adapter_share_of_targets"] < 1


def test_json_table_and_docs_are_produced(result, tmp_path):
    text = json.dumps(_report.jsonable(result))
    assert json.loads(text)["routing_overhead"] == pytest.approx(result["routing_overhead"])
    table = _report.table(result)
    for key in KEYS:
        assert key in table
    paths = _report.write_docs(result, tmp_path, command="python bench/run.py --smoke")
    page = (tmp_path / "benchmarks.md").read_text()
    assert "| Routing overhead |" in page
    assert "is the dispatch" in page
    assert result["machine"]["cpu"] in page
    assert (tmp_path / "images" / "bench_step_cost.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(paths) == 2


def test_cli_renders_a_saved_result_as_one_json_object(result, tmp_path, capsys):
    saved = tmp_path / "result.json"
    saved.write_text(json.dumps(_report.jsonable(result)))
    assert main(["--from-result", str(saved), "--json", "--no-docs"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert {*KEYS} <= set(printed)
    assert printed["pruning_cost_ratio"] == pytest.approx(result["pruning_cost_ratio"])


def test_a_router_with_its_work_emptied_dispatches_and_leaves_the_plain_output():
    """The dispatch-only call the routing cost is split with routes every module and changes nothing."""
    import torch

    from bench import _hook_cost, _model
    from bench._workload import Workload
    from loratorio.routing import Router

    with torch.inference_mode():
        model = _model.build("tiny")
        adapters = _model.make_adapters(model.targets, 2, rank=4)
        work = Workload(model, adapters, batch=1, latent=8)
        args, rows = work.inputs(3, True), _hook_cost.routed_rows(work, 2)
        plain = model(*args)
        with work.router.route(rows):
            routed = model(*args)
        router = Router(model.targets, adapters)
        with router.route(rows):
            assert torch.equal(model(*args), routed)
        _hook_cost.dispatch_only(router)
        calls = []
        handles = [m.register_forward_pre_hook(lambda mod, a: calls.append(mod.forward)) for m in router.modules]
        try:
            with router.route(rows):
                emptied = model(*args)
        finally:
            for handle in handles:
                handle.remove()
        assert torch.equal(emptied, plain) and not torch.equal(routed, plain)
        # every target still ran through its routed forward (set on the instance for the block)
        assert len(calls) == len(router.modules)
        assert all(getattr(f, "__qualname__", "").startswith("_routed_forward") for f in calls)


def test_rank_forms_times_both_forms_of_every_shape():
    from bench import rank_forms

    out = rank_forms.measure(reps=1)
    assert [(s["n"], s["c"], s["r"], s["o"]) for s in out["shapes"]] == rank_forms.SHAPES
    for shape in out["shapes"]:
        for kind in ("per_adapter", "shared"):
            timing = shape[kind]
            assert timing["rows_first_us"] > 0 and timing["transposed_us"] > 0
            assert math.isclose(timing["transposed_over_rows_first"],
                                timing["transposed_us"] / timing["rows_first_us"], rel_tol=0.05)
