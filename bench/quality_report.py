"""Writes the quality benchmark's report (markdown + figures) from one run's results.

Every number in the report is read from the run's results; the prose around the
numbers is chosen by comparisons made here: paired differences over the same
compositions, noise seeds and training seeds, with their standard errors, and the sign
of each training seed's own difference, so that no verdict rests on one seed.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from bench.quality_world import CATEGORIES, CONCEPT_LIST, CONCEPTS, HEADS, SIZE, concept_name

MERGE = "merge"
PAPER = "loratorio paper"
PAPER_LAMBDA1 = "loratorio paper, lambda 1"  # the paper's step with the default's lambda (no LoRA amplification)


def default_name(method: str) -> str:
    """Row name of the shipped default method."""
    return f"loratorio {method} (default)"


def _f(x, digits=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def paired(results: dict, a: str, b: str, key: str = "recall_per_comp", n: int | None = None) -> tuple[float, float]:
    """Mean and standard error of per-composition ``key`` of ``a`` minus ``b`` (same compositions, noise and
    training seeds), over compositions of size ``n`` when given."""
    da, db = np.array(results[a][key]), np.array(results[b][key])
    if n is not None:
        keep = np.array(results[a]["comp_n"]) == n
        da, db = da[keep], db[keep]
    d = da - db
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(d.mean()), se


def _verdict(diff: float, se: float) -> str:
    """``better``/``worse`` when the paired difference is at least two standard errors from zero."""
    se = 0.0 if math.isnan(se) else se
    if diff == 0 or abs(diff) < 2 * se:
        return "within noise"
    return "better" if diff > 0 else "worse"


def _short(name: str) -> str:
    name = name.replace("loratorio", "LT").replace(" (no LoRA)", "").replace(" (default)", "\n(default)")
    if "\n" not in name and len(name) > 14:
        head, _, tail = name.partition(" ")
        name = head + "\n" + tail
    return name


def _label(comp) -> str:
    return " + ".join(concept_name(c) for c in comp)


def grid_figure(path: Path, methods, comps, outputs, key: str, rows: list[int], found) -> None:
    """Example images: compositions (rows) by method (columns), same noise per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m.name for m in methods]
    fig, axes = plt.subplots(len(rows), len(names), figsize=(len(names) * 1.05, len(rows) * 1.2 + 0.5),
                             squeeze=False)
    for r, pos in enumerate(rows):
        comp = comps[pos][1]
        for c, name in enumerate(names):
            ax = axes[r, c]
            ax.imshow(outputs[name][key]["images"][pos].permute(1, 2, 0).numpy(), interpolation="nearest")
            ax.set_xlabel(found(name, pos, comp), fontsize=6, labelpad=1)
            if r == 0:
                ax.set_title(_short(name), fontsize=6)
        axes[r, 0].set_ylabel(_label(comp).replace(" + ", "\n"), fontsize=5, rotation=0, ha="right", va="center",
                              labelpad=2)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def loss_figure(path: Path, seeds: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
    for run in seeds:
        train = run["train"]
        if train.get("base"):
            s, v = zip(*train["base"]["loss"])
            axes[0].plot(s, v, label=f"seed {run['seed']}")
        for name, info in (train.get("loras") or {}).items():
            s, v = zip(*info["loss"])
            axes[1].plot(s, v, lw=0.6, label=f"{name} ({run['seed']})" if run is seeds[0] else None)
    axes[0].set_title("base model (v-prediction MSE)", fontsize=8)
    axes[0].legend(fontsize=6)
    axes[1].set_title("LoRAs, base frozen (all seeds)", fontsize=8)
    axes[1].legend(fontsize=5, ncol=2)
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def example_rows(comps, count: int = 8) -> list[int]:
    """Positions of example compositions, spread over the sizes N present."""
    ns = sorted({len(c) for _, c in comps})
    per_n = max(1, count // len(ns))
    rows = []
    for n in ns:
        group = [i for i, (_, c) in enumerate(comps) if len(c) == n]
        picks = np.linspace(0, len(group) - 1, min(per_n, len(group))).round().astype(int)
        rows += [group[p] for p in sorted(set(picks.tolist()))]
    return rows[:count]


def _table(headers, rows) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def _seed_signs(per_seed: list[dict], a: str, b: str, key: str) -> str:
    """Each training seed's own difference ``a - b`` of the summary score ``key``."""
    parts = []
    for run in per_seed:
        ra, rb = run["results"][a], run["results"][b]
        va = ra["two_subject"]["subjects"] if key == "two_subject" else ra[key]
        vb = rb["two_subject"]["subjects"] if key == "two_subject" else rb[key]
        parts.append(f"{va - vb:+.3f}")
    return ", ".join(parts)


def write_report(summary: dict, methods, comps, per_seed: list[dict], out: Path) -> None:
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    results = summary["results"]
    default = default_name(summary["default_method"])
    seeds = [run["seed"] for run in per_seed]
    ns = sorted({len(c) for _, c in comps})
    outputs = per_seed[0]["outputs"]
    first = per_seed[0]["results"]
    pairs = [(i, [tuple(x) for x in c]) for i, c in enumerate(summary["two_subject_compositions"])]
    grid_figure(out / "images" / "quality_grid.png", methods, comps, outputs, "main", example_rows(comps),
                lambda name, pos, comp: f"{round(first[name]['recall_per_comp'][pos] * len(comp))}/{len(comp)}")
    pair_rows = example_rows(pairs, 6)
    grid_figure(out / "images" / "quality_two_subjects.png", methods, pairs, outputs, "pairs", pair_rows,
                lambda name, pos, comp: f"{round(first[name]['two_subject']['subjects_per_comp'][pos] * 2)}/2")
    loss_figure(out / "images" / "quality_loss.png", per_seed)

    L = ["# Quality benchmark: multi-LoRA composition in a trained mini-world", ""]
    L += ["This page is written by `bench/quality.py` in one run; every number on it comes from that run.", ""]
    L += ["No real Stable Diffusion weights, civitai LoRAs or CLIP can be used here, so the benchmark builds a "
          "world small enough to train on a CPU and asks the composition question there: when several LoRAs are "
          "composed, does every concept survive, and do two characters stay two?", ""]
    L += _world(summary, comps, pairs, per_seed)
    L += _judge(per_seed)
    L += ["## Results", ""]
    L += [f"Scores are averaged over the {len(seeds)} training seeds ({', '.join(map(str, seeds))}): each seed "
          "trains its own base model, LoRAs and judge. Recall is averaged per N, then over N, as ComposLoRA "
          "tables do. **two-subject** = share of the two requested characters that appear as one of the two "
          "figures; **both** = share of images with both.", ""]
    head = ["method", "settings", *(f"recall N={n}" for n in ns), "recall avg", "all avg", "spurious", "FD",
            "two-subject", "both", *(f"evals/step N={n}" for n in ns)]
    body = []
    for m in methods:
        r = results[m.name]
        body.append([m.name, m.settings() or "-", *(_f(r["recall_by_n"][n]) for n in ns),
                     f"**{_f(r['recall_avg'])}**", _f(r["all_avg"]), _f(r["spurious"]), _f(r["fd"], 1),
                     f"**{_f(r['two_subject'])}**", _f(r["two_subject_both"]), *(r["evals_by_n"][n] for n in ns)])
    L += _table(head, body)
    L += ["", "Evaluations per step count images through the denoiser (a batch row each). LoRAtorio rows run "
          "every LoRA as its own branch next to the base: `2N + 2` per step (`N + 2` with lambda 0); with the "
          "merged row (`joint` > 0: every LoRA of the composition at once, for its cond and its uncond) `2N + 4`. "
          "The rows named `loratorio <method>` are sampled through `Composer.from_settings` with those settings, "
          "exactly what a user of the extension gets; the ablation rows call `loratorio.fusion.compose` with one "
          "option changed.", ""]
    L += ["Per training seed (recall avg / FD / two-subject):", ""]
    L += _table(["method", *(f"seed {s}" for s in seeds)],
                [[m.name, *(f"{_f(run['results'][m.name]['recall_avg'])} / {_f(run['results'][m.name]['fd'], 1)} / "
                            f"{_f(run['results'][m.name]['two_subject']['subjects'])}" for run in per_seed)]
                 for m in methods])
    L += ["", "Recall per category (all N together):", ""]
    L += _table(["method", *CATEGORIES],
                [[m.name, *(_f(results[m.name]["recall_by_category"].get(cat)) for cat in CATEGORIES)]
                 for m in methods])
    L += ["", "![examples](images/quality_grid.png)", "",
          f"Example compositions (rows) per method (columns), training seed {seeds[0]}, same noise per row; under "
          "each image the concepts the judge found.", "",
          "![two subjects](images/quality_two_subjects.png)", "",
          "Two characters in one image (prompt: `pair` plus both triggers); under each image how many of the two "
          "characters the judge found among the figures.", ""]
    L += ["## What the evidence says", ""]
    L += _evidence(results, methods, per_seed, default, ns)
    L += ["", "## Reproduce", "", "```", ".venv/bin/python bench/quality.py                 # full run (this page)",
          ".venv/bin/python bench/quality.py --quick --json  # small sizes; one JSON object on stdout", "```", "",
          f"This run took {summary['seconds_total']:.0f} s on a shared 2-core machine (training "
          f"{sum(r['seconds_build'] for r in per_seed):.0f} s of it when not cached). Trained artefacts are "
          "cached under `~/.cache/loratorio-quality/<config hash>/` (`$LORATORIO_QUALITY_CACHE` overrides).", ""]
    (out / "quality.md").write_text("\n".join(L))


def _world(summary, comps, pairs, per_seed) -> list[str]:
    config = summary["config"]
    cats = ", ".join(f"{cat} ({', '.join(CONCEPTS[cat])})" for cat in CATEGORIES)
    base = per_seed[0]["train"].get("base") or {}
    L = ["## The world", ""]
    sizes = sorted({len(c) for _, c in comps})
    L += [f"- Images: {SIZE}x{SIZE} RGB, drawn procedurally; {len(CONCEPT_LIST)} named concepts in "
          f"{len(CATEGORIES)} categories as in one ComposLoRA subset: {cats}. Each category also has a generic "
          "member (a plain rectangle figure, dull brown clothing, no style, a flat greyish background, no object).",
          "- Layouts: one figure in the middle (caption `person ...`) or a pair of smaller figures side by side "
          "(caption `pair ...`); captions carry one trigger token per named concept.",
          f"- Base model: a small UNet (v-prediction, cross-attention on token embeddings at every resolution, "
          f"{base.get('params', 'n/a')} parameters) trained from scratch on generic scenes only, whose captions "
          "sometimes carry trigger words that change nothing (the base knows the words, not the concepts); the "
          "caption is dropped for part of each batch, so the unconditional branch is real.",
          "- LoRAs: one per concept, rank 8 on the attention projections and rank 4 on the residual 3x3 "
          "convolutions, trained with the base frozen on images that show only that concept (narrow domain; a "
          "character LoRA also sees its figure as one of a pair next to a generic figure, on either side), saved "
          "as kohya-style safetensors and loaded back as `loratorio.lora.LowRank` adapters. All branches of a "
          "step run as rows of one model call through `loratorio.routing.Router`.",
          f"- Compositions: ComposLoRA's rule, one character plus N-1 concepts of distinct other categories: "
          f"{len(comps)} sets ({', '.join(f'N={n}: {sum(len(c) == n for _, c in comps)}' for n in sizes)}).",
          f"- Two-subject set: two character LoRAs in one image (every pair of characters, alone and with one "
          f"concept of another category), {len(pairs)} images ({config['pair_seeds']} noise seeds per set). "
          "Merging two character LoRAs tends to melt them into one hybrid figure.",
          f"- Sampling: DDIM, {config['sample_steps']} steps, guidance scale {config['cfg']:g}; one fixed noise "
          "per image shared by all methods.", ""]
    L += ["Training configuration: " + ", ".join(f"`{k}={v}`" for k, v in config.items()) + ".", ""]
    for run in per_seed:
        b, lor = run["train"].get("base"), run["train"].get("loras") or {}
        if b and lor:
            L += [f"- seed {run['seed']}: base loss {_f(b['loss'][0][1])} -> {_f(b['loss'][-1][1])} "
                  f"({b['seconds']:.0f} s); LoRAs (mean) {_f(np.mean([v['loss'][0][1] for v in lor.values()]))} -> "
                  f"{_f(np.mean([v['loss'][-1][1] for v in lor.values()]))} "
                  f"({sum(v['seconds'] for v in lor.values()):.0f} s for all)."]
    L += ["", "![training loss](images/quality_loss.png)", ""]
    return L


def _judge(per_seed) -> list[str]:
    L = ["## The judge", ""]
    L += ["A small CNN per training seed with one softmax head per category (generic member included) and one for "
          "the right figure of a pair, trained on rendered images with their ground-truth labels (light noise "
          "added). Held-out accuracy on fresh rendered images:", ""]
    L += _table(["seed", *HEADS, "mean", "all right"],
                [[run["seed"], *(_f(a) for a in run["judge"]["per_category"]), _f(run["judge"]["mean"]),
                  _f(run["judge"]["all"])] for run in per_seed])
    L += ["", "Scores: **recall** = share of the composition's concepts the judge finds; **all** = share of images "
          "with every concept found; **spurious** = share of categories the prompt leaves generic where the judge "
          "finds a named concept; **FD** = Frechet distance between the judge's features of the generated images "
          "and of rendered images with the same labels (lower = closer to real images).", ""]
    L += ["Each LoRA alone (its trigger only, share of images where the judge sees its concept):", ""]
    names = list(per_seed[0]["solo"])
    L += _table(["seed", *names], [[run["seed"], *(_f(run["solo"][n]) for n in names)] for run in per_seed])
    return [*L, ""]


def _evidence(results: dict, methods, per_seed, default: str, ns) -> list[str]:
    names = [m.name for m in methods]
    L = []
    ranked = sorted((n for n in names if n != "base (no LoRA)"), key=lambda n: -results[n]["recall_avg"])
    L += ["- Ranking by average recall: " + ", ".join(f"{n} {_f(results[n]['recall_avg'])}" for n in ranked) + "."]
    if default not in results or MERGE not in results:
        return L
    rows = []
    for other in (MERGE, PAPER, PAPER_LAMBDA1):
        if other not in results:
            continue
        for n in ns:
            d, se = paired(results, default, other, n=n)
            rows.append([f"default - {other}", f"recall N={n}", f"{d:+.3f}", _f(se), _verdict(d, se), ""])
        d, se = paired(results, default, other)
        rows.append([f"default - {other}", "recall, all N", f"{d:+.3f}", _f(se), _verdict(d, se),
                     _seed_signs(per_seed, default, other, "recall_avg")])
        d, se = paired(results, default, other, key="subjects_per_comp")
        rows.append([f"default - {other}", "two-subject", f"{d:+.3f}", _f(se), _verdict(d, se),
                     _seed_signs(per_seed, default, other, "two_subject")])
    L += ["", "Paired differences (same compositions, noise and training seeds; standard error over all of them; "
          "better/worse at two standard errors), with each seed's own difference of the averages:", ""]
    L += _table(["comparison", "score", "difference", "se", "verdict", "per seed"], rows)
    L += [""]
    by_n = [paired(results, default, MERGE, n=n) for n in ns]
    ahead = all(d > se for d, se in by_n)
    fd_ratio = results[default]["fd"] / results[MERGE]["fd"] if results[MERGE]["fd"] else float("nan")
    two_merge = paired(results, default, MERGE, key="subjects_per_comp")
    L += [f"- Against merge, the default is {'ahead' if ahead else 'not ahead'} at every N by more than one "
          "standard error (" + ", ".join(f"N={n} {d:+.3f} (se {_f(se)})" for n, (d, se) in zip(ns, by_n)) + ")."]
    L += [f"- Its FD is {_f(results[default]['fd'], 1)} against merge's {_f(results[MERGE]['fd'], 1)} "
          f"({(fd_ratio - 1) * 100:+.0f} %)."]
    L += [f"- Two subjects: default {_f(results[default]['two_subject'])}, merge {_f(results[MERGE]['two_subject'])}"
          + (f", paper {_f(results[PAPER]['two_subject'])}" if PAPER in results else "")
          + f" (default - merge {two_merge[0]:+.3f}, se {_f(two_merge[1])})."]
    if PAPER in results and PAPER_LAMBDA1 in results:
        same = paired(results, default, PAPER_LAMBDA1, key="subjects_per_comp")
        L += [f"- The paper's step with lambda 1 (the default's; the re-centred negative then does not amplify the "
              f"LoRAs' changes under CFG): two-subject {_f(results[PAPER_LAMBDA1]['two_subject'])}, recall "
              f"{_f(results[PAPER_LAMBDA1]['recall_avg'])}, FD {_f(results[PAPER_LAMBDA1]['fd'], 1)}; with the "
              f"paper's lambda 0.5: two-subject {_f(results[PAPER]['two_subject'])}, FD "
              f"{_f(results[PAPER]['fd'], 1)}. The default against the paper's step at the same lambda, "
              f"two-subject: {same[0]:+.3f} (se {_f(same[1])})."]
    ablations = [m for m in methods if m.kind == "loratorio"]
    if ablations:
        L += ["", "Ablations: one option of the default changed at a time (paired against the default):", ""]
        rows = []
        for m in ablations:
            d, se = paired(results, m.name, default)
            d2, se2 = paired(results, m.name, default, key="subjects_per_comp")
            rows.append([m.name, m.settings(), f"{d:+.3f}", _f(se), _verdict(d, se), f"{d2:+.3f}", _f(se2),
                         f"{results[m.name]['fd'] - results[default]['fd']:+.1f}"])
        L += _table(["variant", "settings", "recall diff", "se", "verdict", "two-subject diff", "se", "FD diff"],
                    rows)
    return L
