"""Quality benchmark: multi-LoRA composition scored in a trained mini-world (a small ComposLoRA).

Builds (and caches outside the repository) a procedurally generated 16x16 world with
ComposLoRA's categories, a small text-conditioned denoiser trained from scratch on its
generic scenes, one LoRA per concept trained with the base frozen, and a judge that
recognises concepts, once per training seed. Then samples ComposLoRA-style compositions
(one character plus N - 1 concepts of distinct other categories, N = 2..5) and a
two-subject set (two character LoRAs in one image) with each composition method on the
same noise, scores the images with the judge and writes the report, with paired
differences over compositions and seeds.

Usage::

    python bench/quality.py            # full run, writes docs/quality.md and docs/images/quality_*.png
    python bench/quality.py --quick    # small sizes, report under the cache directory
    python bench/quality.py --quick --json       # ... and one JSON object on stdout instead of the table
    python bench/quality.py --quick --out docs   # ... or wherever asked

Trained artefacts live in ``~/.cache/loratorio-quality/<config hash>/`` (or
``$LORATORIO_QUALITY_CACHE``): reruns with the same configuration skip training and
sampling of methods already done.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.quality_judge import Judge, frechet_distance, held_out_accuracy, judge_images, train_judge  # noqa: E402
from bench.quality_methods import Method, default_methods, sample  # noqa: E402
from bench.quality_model import TinyUNet, load_kohya, lora_targets, save_kohya  # noqa: E402
from bench.quality_train import train_base, train_lora  # noqa: E402
from bench.quality_world import (  # noqa: E402
    CATEGORIES,
    CONCEPT_LIST,
    VOCAB,
    caption,
    compositions,
    concept_name,
    labels_of,
    render_batch,
    two_subject_compositions,
    two_subject_labels,
)
from loratorio.fusion import method_options  # noqa: E402
from loratorio.settings import Settings  # noqa: E402

WORLD_VERSION = "world-2/model-1"
DEFAULT_METHOD = Settings().method

CONFIGS = {
    "full": dict(base_steps=1000, base_batch=64, lora_steps=200, lora_batch=32, judge_steps=500, judge_batch=128,
                 sample_steps=20, cfg=4.0, per_n=24, chunk=48, judge_holdout=2000, solo_seeds=16, pair_seeds=2,
                 seeds=(0, 1)),
    "quick": dict(base_steps=200, base_batch=32, lora_steps=40, lora_batch=16, judge_steps=120, judge_batch=64,
                  sample_steps=8, cfg=4.0, per_n=2, chunk=48, judge_holdout=500, solo_seeds=4, pair_seeds=1,
                  seeds=(0, 1)),
    "smoke": dict(base_steps=6, base_batch=8, lora_steps=2, lora_batch=4, judge_steps=6, judge_batch=16,
                  sample_steps=3, cfg=4.0, per_n=1, chunk=48, judge_holdout=64, solo_seeds=2, pair_seeds=1,
                  seeds=(0,)),
}
TRAIN_KEYS = ("base_steps", "base_batch", "lora_steps", "lora_batch", "judge_steps", "judge_batch", "judge_holdout",
              "seed")
NOISE_SEED = 10_000
PAIR_NOISE = 2_000_000  # noise indices of the two-subject set start here


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def default_cache() -> Path:
    return Path(os.environ.get("LORATORIO_QUALITY_CACHE", Path.home() / ".cache" / "loratorio-quality"))


def lora_file_name(concept) -> str:
    return f"lora_{concept[0]}_{concept_name(concept)}.safetensors"


def build(config: dict, cache: Path, log=print):
    """Train (or load from ``cache``) the base model, the eleven LoRAs and the judge (``config["seed"]``)."""
    key = _hash({"version": WORLD_VERSION, **{k: config[k] for k in TRAIN_KEYS}})
    folder = cache / key
    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}

    base = TinyUNet(VOCAB)
    if (folder / "base.pt").exists():
        base.load_state_dict(torch.load(folder / "base.pt"))
        base.eval()
    else:
        log(f"training the base model ({config['base_steps']} steps)")
        base, info = train_base(config["base_steps"], config["base_batch"], config["seed"])
        torch.save(base.state_dict(), folder / "base.pt")
        meta["base"] = info
        meta_path.write_text(json.dumps(meta))
    base.requires_grad_(False)

    meta.setdefault("loras", {})
    for i, concept in enumerate(CONCEPT_LIST):
        path = folder / lora_file_name(concept)
        if path.exists():
            continue
        log(f"training LoRA {i + 1}/{len(CONCEPT_LIST)}: {concept_name(concept)} ({config['lora_steps']} steps)")
        tensors, info = train_lora(base, concept, config["lora_steps"], config["lora_batch"], config["seed"] + 1 + i)
        save_kohya(path, tensors, {"concept": concept_name(concept), "category": concept[0]})
        meta["loras"][concept_name(concept)] = info
        meta_path.write_text(json.dumps(meta))

    judge = Judge()
    if (folder / "judge.pt").exists():
        judge.load_state_dict(torch.load(folder / "judge.pt"))
        judge.eval()
    else:
        log(f"training the judge ({config['judge_steps']} steps)")
        t0 = time.time()
        judge, losses = train_judge(config["judge_steps"], config["judge_batch"], config["seed"] + 100)
        meta["judge_seconds"] = time.time() - t0
        torch.save(judge.state_dict(), folder / "judge.pt")
        meta["judge"] = {"loss": losses,
                         "held_out": held_out_accuracy(judge, config["judge_holdout"], config["seed"] + 200)}
        meta_path.write_text(json.dumps(meta))
    judge.requires_grad_(False)
    targets = lora_targets(base)
    loras = [load_kohya(folder / lora_file_name(c), targets) for c in CONCEPT_LIST]
    return base, targets, loras, judge, meta, folder


def select_compositions(per_n: int) -> list[tuple[int, tuple]]:
    """(index in the full list, composition); ``per_n = 0``: all 240, else ``per_n`` evenly spread per N."""
    full = list(enumerate(compositions()))
    if not per_n:
        return full
    out = []
    for n in range(2, 6):
        group = [item for item in full if len(item[1]) == n]
        picks = np.linspace(0, len(group) - 1, min(per_n, len(group))).round().astype(int)
        out += [group[p] for p in picks]
    return out


def two_subject_set(pair_seeds: int) -> list[tuple[int, tuple]]:
    """(noise index, composition) of the two-subject set: each pair of characters, alone and with one
    concept of another category, on ``pair_seeds`` noise seeds each."""
    return [(PAIR_NOISE + i * pair_seeds + s, comp)
            for i, comp in enumerate(two_subject_compositions()) for s in range(pair_seeds)]


def noise_for(index: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(NOISE_SEED + index)
    return torch.randn(1, 3, 16, 16, generator=gen)


def method_key(method: Method) -> str:
    """Cache key of a method's samples (fields at their defaults that older keys lacked are left out)."""
    fields = dataclasses.asdict(method)
    for name, default in (("probe_every", 1), ("descriptor", "mean")):
        if fields.get(name) == default:
            del fields[name]
    if method.kind == "engine" and method_options(method.method):
        # a named method's options may change between versions: its samples are keyed by what it runs
        fields["fusion_options"] = sorted(method_options(method.method).items())
    return _hash(fields)


def _round(x: float) -> float | int:
    return int(x) if float(x).is_integer() else round(float(x), 2)


def generate(method: Method, base, targets, loras, comps, config, pair: bool = False) -> dict:
    """Images ``[B, 3, 16, 16]``, composition maps (LoRAtorio) and seconds for ``comps`` in order.

    ``pair``: the prompts ask for a pair of figures (the two-subject set).
    """
    images, maps, evals, t0 = [], {}, {}, time.time()
    for n in sorted({len(c) for _, c in comps}):
        group = [(pos, item) for pos, item in enumerate(comps) if len(item[1]) == n]
        for s in range(0, len(group), config["chunk"]):
            chunk = group[s:s + config["chunk"]]
            branches = [[CONCEPT_LIST.index(c) for c in comp] for _, (_, comp) in chunk]
            tokens = torch.tensor([caption(comp, pair=pair) for _, (_, comp) in chunk])
            noise = torch.cat([noise_for(idx) for _, (idx, _) in chunk])
            imgs, wmap, ev = sample(method, base, targets, loras, branches, tokens, noise, config["sample_steps"],
                                    config["cfg"])
            for b, (pos, _) in enumerate(chunk):
                images.append((pos, imgs[b]))
                evals[pos] = float(ev[b])
                if wmap is not None:
                    maps[pos] = wmap[:, b]
    images = torch.stack([img for _, img in sorted(images, key=lambda p: p[0])])
    return {"images": images, "maps": maps, "evals": [evals[p] for p in range(len(comps))],
            "seconds": time.time() - t0}


def score(judge, comps, images: torch.Tensor, real_feats: torch.Tensor) -> dict:
    """Judge a method's images against the compositions they were asked for.

    The Frechet distance is taken on judge features standardised by the real images'
    per-feature mean and spread, so its scale does not depend on the judge's training.
    """
    pred, conf, feats = judge_images(judge, images)
    mu, sd = real_feats.mean(0), real_feats.std(0).clamp_min(1e-6)
    hits, spurious, per_cat = [], [], {cat: [] for cat in CATEGORIES}
    for b, (_, comp) in enumerate(comps):
        want = labels_of(comp).values
        h = []
        for ci, cat in enumerate(CATEGORIES):
            if want[ci]:
                ok = int(pred[b, ci]) == want[ci]
                h.append(ok)
                per_cat[cat].append(ok)
            else:
                spurious.append(int(pred[b, ci]) != 0)
        hits.append(h)
    recall = [float(np.mean(h)) for h in hits]
    by_n = {}
    for n in range(2, 6):
        rs = [r for r, (_, c) in zip(recall, comps) if len(c) == n]
        al = [all(h) for h, (_, c) in zip(hits, comps) if len(c) == n]
        if rs:
            by_n[n] = {"recall": float(np.mean(rs)), "all": float(np.mean(al)), "count": len(rs)}
    return {
        "recall_per_comp": recall,
        "recall_by_n": by_n,
        "recall_avg": float(np.mean([v["recall"] for v in by_n.values()])),
        "all_avg": float(np.mean([v["all"] for v in by_n.values()])),
        "recall_by_category": {k: float(np.mean(v)) for k, v in per_cat.items() if v},
        "spurious": float(np.mean(spurious)) if spurious else 0.0,
        "confidence": float(conf.mean()),
        "fd": frechet_distance((feats - mu) / sd, (real_feats - mu) / sd) if len(comps) > 2 else float("nan"),
    }


def score_two_subject(judge, comps, images: torch.Tensor) -> dict:
    """Two characters asked for in one image: is each of them one of the two figures drawn?

    ``subjects`` = share of the two characters found (left or right figure), averaged
    over images; ``both`` = share of images with both; ``others`` = recall of the
    further concept of N = 3 sets.
    """
    pred, _, _ = judge_images(judge, images)
    found, both, others = [], [], []
    for b, (_, comp) in enumerate(comps):
        want = two_subject_labels(comp).values
        drawn = {int(pred[b, 0])} | ({int(pred[b, 5]) - 1} if int(pred[b, 5]) > 0 else set())
        hits = [want[0] in drawn, want[5] - 1 in drawn]
        found.append(float(np.mean(hits)))
        both.append(all(hits))
        others += [int(pred[b, ci]) == want[ci] for ci in range(1, len(CATEGORIES)) if want[ci]]
    return {"subjects_per_comp": found, "subjects": float(np.mean(found)), "both": float(np.mean(both)),
            "others": float(np.mean(others)) if others else float("nan")}


def solo_recall(base, targets, loras, judge, config, log=print) -> dict:
    """Each LoRA alone (prompt: person + its trigger) on ``solo_seeds`` seeds: does the judge see its concept?"""
    log("sampling: each LoRA alone")
    seeds = config["solo_seeds"]
    out = {}
    for j, concept in enumerate(CONCEPT_LIST):
        tokens = torch.tensor([caption([concept])] * seeds)
        noise = torch.cat([noise_for(1_000_000 + s) for s in range(seeds)])
        imgs, _, _ = sample(Method("alone", "merge"), base, targets, loras, [[j]] * seeds, tokens, noise,
                         config["sample_steps"], config["cfg"])
        pred, _, _ = judge_images(judge, imgs)
        ci = CATEGORIES.index(concept[0])
        out[concept_name(concept)] = float((pred[:, ci] == concept[1]).float().mean())
    return out


def _sampled(path: Path, make) -> dict:
    if path.exists():
        return torch.load(path)
    gen = make()
    torch.save(gen, path)
    return gen


def log_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_seed(config: dict, seed: int, cache: Path, methods: list[Method], log=print) -> dict:
    """One trained world (training seed ``seed``): sample and score every method on both sets."""
    torch.set_num_threads(1)
    config = dict(config, seed=seed)
    t_start = time.time()
    base, targets, loras, judge, meta, folder = build(config, cache, log)
    t_built = time.time()
    comps = select_compositions(config["per_n"])
    pairs = two_subject_set(config["pair_seeds"])
    real = torch.from_numpy(render_batch([labels_of(c) for _, c in comps], np.random.default_rng(seed + 300)))
    _, _, real_feats = judge_images(judge, real)
    eval_dir = folder / ("eval_" + _hash({k: config[k] for k in ("sample_steps", "cfg", "per_n")}))
    eval_dir.mkdir(exist_ok=True)
    results, outputs = {}, {}
    for method in methods:
        key = method_key(method)

        def make(method=method):
            log(f"seed {seed}: sampling {method.name}")
            return generate(method, base, targets, loras, comps, config)

        def make_pairs(method=method):
            log(f"seed {seed}: sampling {method.name} (two subjects)")
            return generate(method, base, targets, loras, pairs, config, pair=True)

        gen = _sampled(eval_dir / f"{key}.pt", make)
        pair_gen = _sampled(eval_dir / f"{key}-pairs{config['pair_seeds']}.pt", make_pairs)
        res = score(judge, comps, gen["images"], real_feats)
        res["seconds"] = gen["seconds"]
        evals = gen.get("evals") or [float(method.evals_per_step(len(c))) for _, c in comps]
        res["evals_by_n"] = {n: _round(np.mean([e for e, (_, c) in zip(evals, comps) if len(c) == n]))
                             for n in range(2, 6)}
        res["evals_avg"] = float(np.mean(evals))
        res["two_subject"] = score_two_subject(judge, pairs, pair_gen["images"])
        results[method.name] = res
        outputs[method.name] = {"main": gen, "pairs": pair_gen}
    solo_path = eval_dir / f"solo-{config['solo_seeds']}.json"
    if solo_path.exists():
        solo = json.loads(solo_path.read_text())
    else:
        solo = solo_recall(base, targets, loras, judge, config, log)
        solo_path.write_text(json.dumps(solo))
    return {
        "seed": seed,
        "solo": solo,
        "judge": meta["judge"]["held_out"],
        "results": results,
        "outputs": outputs,
        "seconds_build": t_built - t_start,
        "train": {"base": meta.get("base"), "loras": meta.get("loras"), "judge_loss": meta["judge"]["loss"],
                  "judge_seconds": meta.get("judge_seconds")},
        "cache": str(folder),
    }


def pool_seeds(per_seed: list[dict], methods: list[Method]) -> dict:
    """Per method, the seeds' scores together: means over seeds, per-composition lists concatenated
    (seed-major, same order for every method, so differences between methods stay paired)."""
    pooled = {}
    for method in methods:
        rs = [run["results"][method.name] for run in per_seed]
        pooled[method.name] = {
            "recall_by_n": {n: float(np.mean([r["recall_by_n"][n]["recall"] for r in rs])) for n in range(2, 6)
                            if all(n in r["recall_by_n"] for r in rs)},
            "all_by_n": {n: float(np.mean([r["recall_by_n"][n]["all"] for r in rs])) for n in range(2, 6)
                         if all(n in r["recall_by_n"] for r in rs)},
            "recall_avg": float(np.mean([r["recall_avg"] for r in rs])),
            "recall_avg_by_seed": [r["recall_avg"] for r in rs],
            "all_avg": float(np.mean([r["all_avg"] for r in rs])),
            "spurious": float(np.mean([r["spurious"] for r in rs])),
            "confidence": float(np.mean([r["confidence"] for r in rs])),
            "fd": float(np.mean([r["fd"] for r in rs])),
            "fd_by_seed": [r["fd"] for r in rs],
            "recall_by_category": {c: float(np.mean([r["recall_by_category"][c] for r in rs]))
                                   for c in rs[0]["recall_by_category"]},
            "two_subject": float(np.mean([r["two_subject"]["subjects"] for r in rs])),
            "two_subject_by_seed": [r["two_subject"]["subjects"] for r in rs],
            "two_subject_both": float(np.mean([r["two_subject"]["both"] for r in rs])),
            "two_subject_others": float(np.mean([r["two_subject"]["others"] for r in rs])),
            "recall_per_comp": [x for r in rs for x in r["recall_per_comp"]],
            "comp_n": [n for r in rs for n in r["comp_n"]],
            "subjects_per_comp": [x for r in rs for x in r["two_subject"]["subjects_per_comp"]],
            "evals_by_n": rs[0]["evals_by_n"],
            "evals_avg": float(np.mean([r["evals_avg"] for r in rs])),
            "seconds": float(sum(r["seconds"] for r in rs)),
        }
    return pooled


def run(config: dict, cache: Path, out: Path | None, methods: list[Method] | None = None, log=print) -> dict:
    """Build, sample and score every training seed of ``config``; with ``out``, write ``out/quality.md``
    and ``out/images/quality_*.png``."""
    torch.set_num_threads(1)
    t_start = time.time()
    methods = methods or default_methods()
    seeds = list(config["seeds"])
    if len(seeds) > 1 and log in (print, log_stderr):
        # one process per training seed: each trains and samples single-threaded
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=len(seeds), mp_context=ctx) as pool:
            per_seed = list(pool.map(run_seed, [config] * len(seeds), seeds, [cache] * len(seeds),
                                     [methods] * len(seeds), [log] * len(seeds)))
    else:
        per_seed = [run_seed(config, seed, cache, methods, log) for seed in seeds]
    comps = select_compositions(config["per_n"])
    for run_ in per_seed:
        for res in run_["results"].values():
            res["comp_n"] = [len(c) for _, c in comps]
    summary = {
        "config": config,
        "default_method": DEFAULT_METHOD,
        "methods": [dataclasses.asdict(m) for m in methods],
        "seeds": [{k: v for k, v in r.items() if k != "outputs"} for r in per_seed],
        "results": pool_seeds(per_seed, methods),
        "compositions": [[list(x) for x in c] for _, c in comps],
        "two_subject_compositions": [[list(x) for x in c] for _, c in two_subject_set(config["pair_seeds"])],
        "seconds_total": time.time() - t_start,
    }
    if out is not None:
        from bench.quality_report import write_report

        write_report(summary, methods, comps, per_seed, out)
    return summary


def json_summary(summary: dict) -> dict:
    """The machine-readable result: per method recall by N, its average, FD and the two-subject score."""
    return {
        "default_method": summary["default_method"],
        "seeds": list(summary["config"]["seeds"]),
        "methods": {
            name: {"recall_by_n": {str(n): round(v, 4) for n, v in r["recall_by_n"].items()},
                   "recall_avg": round(r["recall_avg"], 4), "fd": round(r["fd"], 3),
                   "two_subject": round(r["two_subject"], 4), "evals_per_step": r["evals_by_n"]}
            for name, r in summary["results"].items()
        },
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes (a few minutes)")
    size.add_argument("--smoke", action="store_true", help="tiny sizes (seconds; for tests)")
    parser.add_argument("--cache", type=Path, default=None, help="artefact cache (default ~/.cache/loratorio-quality)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where quality.md and images/ go (default: docs/ for the full run, else the cache)")
    parser.add_argument("--json", action="store_true", help="print one JSON object with the results (no table)")
    args = parser.parse_args(argv)
    name = "quick" if args.quick else "smoke" if args.smoke else "full"
    cache = args.cache or default_cache()
    out = args.out or (ROOT / "docs" if name == "full" else cache / f"report-{name}")
    t0 = time.time()
    summary = run(CONFIGS[name], cache, out, log=log_stderr if args.json else print)
    if args.json:
        print(json.dumps(json_summary(summary)))
        return 0
    for mname, res in summary["results"].items():
        print(f"{mname:32s} recall {res['recall_avg']:.3f}  two-subject {res['two_subject']:.3f}  "
              f"fd {res['fd']:.2f}  evals/step {res['evals_avg']:.1f}")
    print(f"report: {out / 'quality.md'}  ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
