"""Writes the quality benchmark's report (markdown + figures) from one run's results.

Every number in the report is read from the run's results; the prose around the
numbers is chosen by comparisons made here (paired differences over the same
compositions and seeds, with their standard errors).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from bench.quality_world import CATEGORIES, CONCEPT_LIST, CONCEPTS, NUM_CLASSES, SIZE, concept_name

DEFAULT = "loratorio (default)"
CAT_COLOURS = {
    "character": (1.0, 0.55, 0.0),
    "clothing": (0.9, 0.1, 0.1),
    "style": (0.6, 0.2, 0.9),
    "background": (0.1, 0.45, 1.0),
    "object": (1.0, 0.9, 0.1),
}
_COLOUR_NAMES = {"character": "orange", "clothing": "red", "style": "purple", "background": "blue",
                 "object": "yellow"}


def _f(x, digits=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def paired(results: dict, a: str, b: str) -> tuple[float, float]:
    """Mean and standard error of per-composition recall of ``a`` minus ``b`` (same seeds)."""
    d = np.array(results[a]["recall_per_comp"]) - np.array(results[b]["recall_per_comp"])
    se = float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return float(d.mean()), se


def _verdict(diff: float, se: float) -> str:
    """``better``/``worse`` when the paired difference is at least two standard errors from zero."""
    se = 0.0 if math.isnan(se) else se
    if diff == 0 or abs(diff) < 2 * se:
        return "within noise"
    return "better" if diff > 0 else "worse"


def _composition_label(comp) -> str:
    return " + ".join(concept_name(c) for c in comp)


def _map_image(wmap: torch.Tensor, comp) -> np.ndarray:
    """Argmax LoRA per pixel, coloured by its category, brightness = its mean weight."""
    w = wmap.float()
    top, idx = w.max(0)
    colours = torch.tensor([CAT_COLOURS[c[0]] for c in comp])
    img = colours[idx] * top[..., None].clamp(0, 1)
    return img.numpy()


def _short(name: str) -> str:
    """Column title: LoRAtorio settings abbreviated, long names on two lines."""
    name = name.replace("loratorio", "LT").replace(" (no LoRA)", "").replace("candidate: ", "cand.\n")
    if "\n" not in name and len(name) > 14:
        head, _, tail = name.partition(" ")
        name = head + "\n" + tail
    return name


def grid_figure(path: Path, results, methods, comps, outputs, rows: list[int]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [m.name for m in methods]
    map_cols = [n for n in (DEFAULT, "loratorio reverse schedule", "candidate: centred similarity") if n in names]
    ncols = len(names) + len(map_cols)
    fig, axes = plt.subplots(len(rows), ncols, figsize=(ncols * 1.05, len(rows) * 1.25 + 0.6), squeeze=False)
    for r, pos in enumerate(rows):
        comp = comps[pos][1]
        for c, name in enumerate(names):
            ax = axes[r, c]
            ax.imshow(outputs[name]["images"][pos].permute(1, 2, 0).numpy(), interpolation="nearest")
            rec = results[name]["recall_per_comp"][pos]
            ax.set_xlabel(f"{round(rec * len(comp))}/{len(comp)}", fontsize=6, labelpad=1)
            if r == 0:
                ax.set_title(_short(name), fontsize=6)
        for c, name in enumerate(map_cols):
            ax = axes[r, len(names) + c]
            ax.imshow(_map_image(outputs[name]["maps"][pos], comp), interpolation="nearest")
            if r == 0:
                ax.set_title("map:\n" + _short(name), fontsize=6)
        axes[r, 0].set_ylabel(_composition_label(comp).replace(" + ", "\n"), fontsize=5, rotation=0, ha="right",
                              va="center", labelpad=2)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    legend = ", ".join(f"{cat} {_COLOUR_NAMES[cat]}" for cat in CATEGORIES)
    fig.text(0.5, 0.005, "maps: argmax LoRA per pixel, coloured by category (" + legend +
             "), brightness = its mean weight over steps; "
             "under each image: concepts the judge found", ha="center", fontsize=6)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=130)
    plt.close(fig)


def loss_figure(path: Path, train: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8))
    if train.get("base"):
        s, v = zip(*train["base"]["loss"])
        axes[0].plot(s, v)
    axes[0].set_title("base model (v-prediction MSE)", fontsize=8)
    for name, info in (train.get("loras") or {}).items():
        s, v = zip(*info["loss"])
        axes[1].plot(s, v, label=name, lw=0.8)
    axes[1].set_title("LoRAs, base frozen", fontsize=8)
    axes[1].legend(fontsize=5, ncol=2)
    for ax in axes:
        ax.set_yscale("log")
        ax.set_xlabel("step", fontsize=7)
        ax.tick_params(labelsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def example_rows(comps, count: int = 8) -> list[int]:
    """Positions of example compositions: spread over N, as many per N as fit in ``count``."""
    by_n = {n: [i for i, (_, c) in enumerate(comps) if len(c) == n] for n in range(2, 6)}
    per_n = max(1, count // 4)
    rows = []
    for n in range(2, 6):
        group = by_n[n]
        if group:
            picks = np.linspace(0, len(group) - 1, min(per_n, len(group))).round().astype(int)
            rows += [group[p] for p in sorted(set(picks.tolist()))]
    return rows[:count]


REGIONS = {
    "centre (character)": (slice(5, 13), slice(5, 11)),
    "top corners (object)": None,
    "bottom rows (background)": (slice(14, 16), slice(0, 16)),
}


def _region_mask(name: str) -> torch.Tensor:
    mask = torch.zeros(SIZE, SIZE, dtype=torch.bool)
    if REGIONS[name] is None:
        mask[1:4, 1:4] = True
        mask[1:4, SIZE - 4:SIZE - 1] = True
    else:
        mask[REGIONS[name]] = True
    return mask


def weight_shares(maps: dict, comps) -> dict:
    """Mean LoRAtorio weight of each category's LoRA per image region, over compositions that contain it.

    With N LoRAs a uniform mix gives 1/N everywhere; a LoRA that owns its region gets
    more there and less elsewhere.
    """
    out = {}
    for region in REGIONS:
        mask = _region_mask(region)
        per_cat = {cat: [] for cat in CATEGORIES}
        for pos, (_, comp) in enumerate(comps):
            if pos not in maps:
                continue
            for i, concept in enumerate(comp):
                per_cat[concept[0]].append(float(maps[pos][i][mask].mean()))
        out[region] = {cat: float(np.mean(v)) for cat, v in per_cat.items() if v}
    return out


def _table(headers, rows) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def write_report(summary: dict, methods, comps, outputs, out: Path) -> None:
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    results, config, judge = summary["results"], summary["config"], summary["judge"]
    ns = sorted({len(c) for _, c in comps})
    rows = example_rows(comps)
    grid_figure(out / "images" / "quality_grid.png", results, methods, comps, outputs, rows)
    loss_figure(out / "images" / "quality_loss.png", summary["train"])

    L = []
    L += ["# Quality benchmark: multi-LoRA composition in a trained mini-world", ""]
    L += ["This page is written by `bench/quality.py`; every number on it comes from the run it describes.", ""]
    L += ["No real Stable Diffusion weights, civitai LoRAs or CLIP can be used here, so the benchmark builds a "
          "world small enough to train on a CPU and asks the method's question there: when several LoRAs are "
          "composed, does every concept survive?", ""]
    L += ["## The world", ""]
    cats = ", ".join(f"{cat} ({', '.join(CONCEPTS[cat])})" for cat in CATEGORIES)
    L += [f"- Images: {SIZE}x{SIZE} RGB, drawn procedurally; {len(CONCEPT_LIST)} named concepts in "
          f"{len(CATEGORIES)} categories as in one ComposLoRA subset: {cats}. Each category also has a generic "
          "member (a plain rectangle figure, dull brown clothing, no style, a flat greyish background, no object).",
          "- Captions: a `person` token plus one trigger token per named concept.",
          "- Base model: a small UNet (v-prediction, cross-attention on token embeddings at every resolution, "
          f"{summary['train']['base']['params'] if summary['train'].get('base') else 'n/a'} parameters) trained "
          "from scratch on generic scenes only, whose captions sometimes carry trigger words that change nothing "
          "(the base knows the words, not the concepts); the caption is dropped for part of each batch, so the "
          "unconditional branch is real.",
          "- LoRAs: one per concept, rank 8 on the attention projections and rank 4 on the residual 3x3 "
          "convolutions, trained with the base frozen on images that show only that concept (narrow domain), "
          "saved as kohya-style safetensors and loaded back as `loratorio.lora.LowRank` adapters. All LoRA "
          "branches of one step run as rows of one model call through `loratorio.routing.Router`.",
          "- Compositions: ComposLoRA's rule, one character plus N-1 concepts of distinct other categories; "
          f"{len(comps)} compositions here ({', '.join(f'N={n}: {sum(len(c) == n for _, c in comps)}' for n in ns)}),"
          f" one fixed noise seed per composition shared by all methods; DDIM, {config['sample_steps']} steps, "
          f"guidance scale {config['cfg']:g}.", ""]
    L += ["Training configuration: " + ", ".join(f"`{k}={v}`" for k, v in config.items()) + ".", ""]
    if summary["train"].get("base"):
        b = summary["train"]["base"]
        lor = summary["train"].get("loras") or {}
        first = np.mean([v["loss"][0][1] for v in lor.values()]) if lor else float("nan")
        last = np.mean([v["loss"][-1][1] for v in lor.values()]) if lor else float("nan")
        L += [f"Training loss: base {_f(b['loss'][0][1])} -> {_f(b['loss'][-1][1])} "
              f"({b['seconds']:.0f} s); LoRAs (mean) {_f(first)} -> {_f(last)} "
              f"({sum(v['seconds'] for v in lor.values()):.0f} s for all).", ""]
    L += ["![training loss](images/quality_loss.png)", ""]

    L += ["## The judge", ""]
    L += ["A small CNN with one softmax head per category (generic member included), trained on rendered images "
          "with their ground-truth labels (light noise added, since generated images are not clean renders). "
          f"Held-out accuracy on {judge['n']} fresh rendered images:", ""]
    L += _table(["category", *CATEGORIES, "mean", "all five right"],
                [["accuracy", *(_f(a) for a in judge["per_category"]), _f(judge["mean"]), _f(judge["all"])]])
    L += ["", f"Chance per category: {', '.join(_f(1 / n, 2) for n in NUM_CLASSES)}. This is accuracy on clean "
          "renders; generated images are blurrier. The base model's row below (prompted with the triggers, it "
          "draws generic scenes) checks that the judge does not see concepts that are not there.", ""]
    L += ["Scores of a generated image: **recall** = share of the composition's concepts the judge finds "
          "(averaged per N, then over N as ComposLoRA tables do); **all** = share of images with every concept "
          "found; **spurious** = share of categories the prompt leaves generic where the judge finds a named "
          "concept; **conf** = the judge's mean max-probability (a quality proxy: clean, unambiguous images score "
          "high); **FD** = Frechet distance between the judge's features of the generated images and of rendered "
          "images with the same labels (lower = closer to real images).", ""]

    solo = summary.get("solo")
    if solo:
        L += ["## Each LoRA alone", ""]
        L += ["Before composing: each LoRA with only its own trigger in the prompt, on "
              f"{config.get('solo_seeds')} seeds; share of images where the judge sees its concept: a reference "
              "for what a composition can expect for that concept.", ""]
        L += _table(["LoRA", *solo], [["recall alone", *(_f(v) for v in solo.values())]])
        weak = [name for name, v in solo.items() if v < 0.5]
        if weak:
            L += ["", f"Weak on their own (the judge finds the concept in fewer than half the images): "
                  f"{', '.join(weak)}. Recall of their category in compositions is low for every method, and says "
                  "more about these LoRAs than about composition."]
        L += [""]
    L += ["## Results", ""]
    head = ["method", "settings", *(f"recall N={n}" for n in ns), "recall avg", "all avg", "spurious", "conf",
            "FD", *(f"evals/step N={n}" for n in ns), "sampling s"]
    body = []
    for m in methods:
        r = results[m.name]
        body.append([m.name, m.settings() or "-", *(_f(r["recall_by_n"][n]["recall"]) for n in ns),
                     f"**{_f(r['recall_avg'])}**", _f(r["all_avg"]), _f(r["spurious"]), _f(r["confidence"]),
                     _f(r["fd"], 2), *(r["evals_by_n"][n] for n in ns), f"{r['seconds']:.0f}"])
    L += _table(head, body)
    L += ["", "Evaluations per step count images through the denoiser (a batch row each); LoRAtorio's cost is the "
          "method's floor `2N + 2` (`N + 2` with lambda = 0); top-k gating inside `compose` still needs every "
          "branch. The `probe` row runs through `loratorio.engine.Composer` with dynamic selection: all branches "
          "on probe steps, only the kept top-k in between; its evaluations are counted, not computed. Sampling "
          "seconds are wall time on this machine for all compositions (shared CPU, indicative).", ""]
    L += ["Recall per category (all N together):", ""]
    L += _table(["method", *CATEGORIES],
                [[m.name, *(_f(results[m.name]["recall_by_category"].get(cat)) for cat in CATEGORIES)]
                 for m in methods])
    L += ["", "![examples](images/quality_grid.png)", "",
          "Example compositions (rows) per method (columns), same seed per row, and LoRAtorio's composition maps.",
          ""]

    shares = None
    if DEFAULT in outputs and outputs[DEFAULT]["maps"]:
        shares = weight_shares(outputs[DEFAULT]["maps"], comps)
        L += ["Where LoRAtorio's default puts each LoRA: mean composition weight of the LoRA of each category in "
              "three regions of the image (averaged over steps and over the compositions that contain it; a "
              "uniform mix would give 1/N):", ""]
        L += _table(["region", *CATEGORIES],
                    [[region, *(_f(v.get(cat)) for cat in CATEGORIES)] for region, v in shares.items()])
        L += [""]
    L += ["## What the evidence says", ""]
    L += _evidence(results, methods, shares)
    L += ["", "## Reproduce", "", "```", ".venv/bin/python bench/quality.py            # full run (this page)",
          ".venv/bin/python bench/quality.py --quick    # small sizes, report under the cache", "```", "",
          f"Cost of this configuration on this (shared, 2-core) machine: training {_train_seconds(summary)}; "
          f"sampling {sum(r['seconds'] for r in results.values()):.0f} s summed over the methods (as recorded when "
          f"each was sampled). This invocation took {summary['seconds_total']:.0f} s, reusing whatever the cache "
          "held. Trained artefacts are cached under `~/.cache/loratorio-quality/<config hash>/` "
          "(`$LORATORIO_QUALITY_CACHE` overrides).", ""]
    (out / "quality.md").write_text("\n".join(L))


def _category_moves(results: dict, a: str, b: str) -> str:
    """Per-category recall of ``a`` against ``b``: gains and losses, largest first."""
    ra, rb = results[a]["recall_by_category"], results[b]["recall_by_category"]
    moves = sorted(((ra[c] - rb[c], c) for c in CATEGORIES if c in ra and c in rb), reverse=True)
    gains = [f"{c} {_f(rb[c])} -> {_f(ra[c])}" for d, c in moves if d > 0]
    losses = [f"{c} {_f(rb[c])} -> {_f(ra[c])}" for d, c in reversed(moves) if d < 0]
    return (f"Per category: gains {', '.join(gains) or 'none'}; losses {', '.join(losses) or 'none'}.")


def _train_seconds(summary: dict) -> str:
    train = summary["train"]
    parts = []
    if train.get("base"):
        parts.append(f"base {train['base']['seconds']:.0f} s")
    if train.get("loras"):
        parts.append(f"LoRAs {sum(v['seconds'] for v in train['loras'].values()):.0f} s")
    if train.get("judge_seconds") is not None:
        parts.append(f"judge {train['judge_seconds']:.0f} s")
    return ", ".join(parts) or "n/a"


def _evidence(results: dict, methods, shares: dict | None = None) -> list[str]:
    L = []
    if DEFAULT not in results:
        return ["LoRAtorio's default was not run."]
    names = [m.name for m in methods]
    ranked = sorted(names, key=lambda n: -results[n]["recall_avg"])
    best = ranked[0]
    baselines = [m.name for m in methods if m.kind in ("merge", "switch", "composite")]
    variants = [m.name for m in methods if m.kind in ("loratorio", "engine") and m.name != DEFAULT
                and getattr(m, "descriptor", "mean") == "mean"]
    candidates = [m.name for m in methods if getattr(m, "descriptor", "mean") != "mean"]
    best_base = max(baselines, key=lambda n: results[n]["recall_avg"], default=None)
    d = results[DEFAULT]
    L += ["- Ranking by average recall: " + ", ".join(f"{n} {_f(results[n]['recall_avg'])}" for n in ranked) + "."]
    loses = False
    if best_base is not None:
        diff, se = paired(results, DEFAULT, best_base)
        v = _verdict(diff, se)
        if v == "better":
            L += [f"- **LoRAtorio's default beats the best baseline ({best_base})**: recall difference "
                  f"{diff:+.3f} (paired over the same compositions and seeds, standard error {_f(se)})."]
        elif v == "within noise":
            loses = True
            L += [f"- **LoRAtorio's default does not beat the best baseline ({best_base}) here**: the recall "
                  f"difference is {diff:+.3f} with standard error {_f(se)}, within noise."]
        else:
            loses = True
            L += [f"- **LoRAtorio's default loses to {best_base} here**: recall difference {diff:+.3f} "
                  f"(standard error {_f(se)}); it ranks {ranked.index(DEFAULT) + 1} of {len(names)}."]
        b = results[best_base]
        worse_n = [n for n in sorted(d["recall_by_n"]) if d["recall_by_n"][n]["recall"] < b["recall_by_n"][n]["recall"]]
        worse_cat = [c for c in CATEGORIES if c in d["recall_by_category"]
                     and d["recall_by_category"][c] < b["recall_by_category"].get(c, 0)]
        better_cat = [c for c in CATEGORIES if c in d["recall_by_category"]
                      and d["recall_by_category"][c] > b["recall_by_category"].get(c, 0)]
        if worse_n or worse_cat:
            L += [f"- Where the default falls behind {best_base}: "
                  + (f"N = {', '.join(str(n) for n in worse_n)}" if worse_n else "at no N")
                  + "; categories "
                  + (", ".join(f"{c} ({_f(d['recall_by_category'][c])} vs {_f(b['recall_by_category'][c])})"
                               for c in worse_cat) if worse_cat else "none") + "."]
        if better_cat:
            L += [f"- Where the default is ahead of {best_base}: "
                  + ", ".join(f"{c} ({_f(d['recall_by_category'][c])} vs {_f(b['recall_by_category'][c])})"
                              for c in better_cat) + "."]
        conf_d, fd_d = d["confidence"] - b["confidence"], d["fd"] - b["fd"]
        L += [f"- Quality proxies, default minus {best_base}: confidence {conf_d:+.3f}, FD {fd_d:+.2f} "
              "(FD lower is better)."]
    for other in baselines:
        if other != best_base:
            diff, se = paired(results, DEFAULT, other)
            L += [f"- Default vs {other}: recall {diff:+.3f} (se {_f(se)}): the default is "
                  f"{_verdict(diff, se).replace('within noise', 'level with it (within noise)')}."]

    L += ["", "Settings, each varied alone from the default (lambda 0.5, c 10, p 2, all LoRAs, our schedule): "
          "paired recall difference variant minus default (mean over all compositions, each weighing the same, "
          "same seeds), its standard error, the verdict for the variant (better/worse when at least two standard "
          "errors from zero), and the quality proxies' differences:", ""]
    rows, better = [], []
    for n in variants:
        diff, se = paired(results, n, DEFAULT)
        v = _verdict(diff, se)
        rows.append([n, f"{diff:+.3f}", _f(se), v, f"{results[n]['confidence'] - d['confidence']:+.3f}",
                     f"{results[n]['fd'] - d['fd']:+.2f}", f"{results[n]['evals_avg'] - d['evals_avg']:+.2f}"])
        if v == "better":
            better.append((n, diff))
    L += _table(["variant", "recall diff", "se", "verdict", "conf diff", "FD diff", "evals/step diff"], rows)
    L += [""]

    def say(name: str, text: str) -> None:
        if name in results:
            diff, se = paired(results, name, DEFAULT)
            L.append(f"- {text}: {diff:+.3f} recall against the default (se {_f(se)}), "
                     f"{_verdict(diff, se)}.")

    rev = "loratorio reverse schedule"
    if rev in results:
        diff, se = paired(results, rev, DEFAULT)
        v = _verdict(diff, se)
        if v == "worse":
            L += [f"- **Temperature schedule**: the other reading (sharp at the first step, uniform at the last) "
                  f"loses {-diff:.3f} recall against ours (se {_f(se)}): the evidence supports our reading "
                  "(uniform at the first step, sharpening as sampling proceeds)."]
        elif v == "better":
            L += [f"- **Temperature schedule**: the other reading (sharp first, uniform last) gains {diff:.3f} "
                  f"recall over ours (se {_f(se)}): the evidence favours the other reading."]
        else:
            L += [f"- **Temperature schedule**: the two readings differ by {diff:+.3f} recall (se {_f(se)}), "
                  "within noise: this world does not settle the question."]
    say("loratorio lambda=0", "Re-centring off (lambda 0, which also saves N evaluations per step)")
    say("loratorio top_k=1", "Top-k 1 (one LoRA per patch)")
    say("loratorio top_k=2", "Top-k 2")
    say("loratorio c=1", "Temperature scale c = 1 (softer)")
    say("loratorio c=100", "Temperature scale c = 100 (sharper)")
    say("loratorio p=1", "Patch size 1")
    say("loratorio p=4", "Patch size 4")
    probe = next((n for n in variants if "probe" in n), None)
    if probe:
        diff, se = paired(results, probe, DEFAULT)
        L += [f"- Dynamic selection ({probe}): {diff:+.3f} recall (se {_f(se)}, {_verdict(diff, se)}) for "
              f"{_f(results[probe]['evals_avg'], 2)} instead of {_f(d['evals_avg'], 2)} evaluations per step."]

    for cand in candidates:
        diff, se = paired(results, cand, DEFAULT)
        line = (f"- Candidate change, tested here only (bench code, not the core): {cand}: {diff:+.3f} recall "
                f"against the default (se {_f(se)}, {_verdict(diff, se)})")
        if best_base is not None:
            diff_b, se_b = paired(results, cand, best_base)
            line += f"; against {best_base} {diff_b:+.3f} (se {_f(se_b)}, {_verdict(diff_b, se_b)})"
        L += [line + ". " + _category_moves(results, cand, DEFAULT)]

    L += ["", "### What to change", ""]
    if loses:
        text = ("- Why the default loses: LoRAtorio gives each patch to the LoRAs that differ most from the base "
                "and mixes their predictions convexly, so a patch keeps mostly one LoRA's change. Merge adds the "
                "LoRAs' changes, which keeps them all when they barely interfere")
        text += ", as they do in this world." if best_base == "merge" else "."
        L += [text]
        if shares:
            centre = shares.get("centre (character)", {})
            top = max(centre, key=centre.get) if centre else None
            if top in ("style", "background"):
                L += [f"- In the centre of the image, where the character is drawn, the {top} LoRA holds "
                      f"{_f(centre[top])} of the weight against {_f(centre.get('character'))} for the character "
                      f"LoRA and {_f(centre.get('clothing'))} for the clothing LoRA (weight-share table): a LoRA "
                      f"that changes the whole image differs from the base in every patch and wins patches that "
                      "belong to local concepts."]
    lam = "loratorio lambda=0"
    if better:
        L += ["- Variants that beat the default beyond noise: "
              + ", ".join(f"{n} ({dd:+.3f})" for n, dd in sorted(better, key=lambda p: -p[1]))
              + ". Proposal: move the default toward the best of them and rerun this benchmark to confirm."]
    else:
        L += ["- No single-setting variant beats the default beyond noise."]
    if lam in results and _verdict(*paired(results, lam, DEFAULT)) != "worse":
        fd_diff = results[lam]["fd"] - d["fd"]
        if fd_diff > 0:
            L += [f"- Re-centring (lambda 0.5) buys no recall here, but turning it off moves the FD by "
                  f"{fd_diff:+.2f} (further from real images; one run, no error bar on the FD): by this proxy it "
                  "earns its N extra evaluations per step through image quality, not concept recall. Keep "
                  "lambda 0.5 as the default; lambda 0 is the cheap setting when evaluations are scarce."]
        else:
            L += [f"- Re-centring (lambda 0.5) buys no recall here and turning it off moves the FD by "
                  f"{fd_diff:+.2f}: lambda 0 would be cheaper (N fewer evaluations per step) at no measured loss "
                  "in this world."]
    if best != DEFAULT and best in variants:
        L += [f"- The best method overall is a LoRAtorio setting ({best})."]
    if best in candidates:
        L += [f"- The best method overall is a bench-only candidate change to LoRAtorio ({best}), ahead of every "
              "baseline and every setting of the method as specified."]
    why = {
        "candidate: channel descriptor": "the averaged-channel descriptor of method step 1 cannot see a change "
        "of hue that keeps the channel mean (red vs brown clothing here; in a latent space, any change carried by "
        "the balance between channels). Proposal: offer a channel-keeping descriptor as a setting",
        "candidate: centred similarity": "a LoRA that differs from the base everywhere (a global style or a "
        "background) wins every patch under the plain SoftMin and crowds out the local concepts; centring each "
        "LoRA's similarity over the image lets each one win where it is unusually different. Proposal: offer the "
        "centring as a setting of the similarity step",
    }
    for cand in candidates:
        if _verdict(*paired(results, cand, DEFAULT)) == "better":
            L += [f"- The candidate '{cand}' improves on the default beyond noise: {why.get(cand, '')}; test it "
                  "on real models, and make it the default if it holds there."]
    if loses:
        L += ["- Not tested here, a further candidate for concepts that share pixels: mixing the LoRAs' "
              "differences from the base (`base + sum_i w_i' (lora_i - base)` with weights that need not sum to "
              "one), which would keep overlapping changes as merge does."]
    return L
