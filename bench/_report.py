"""Turning a benchmark result into a table, ``docs/benchmarks.md`` and plots."""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import re
from pathlib import Path

import torch

GPU_BLOCK = re.compile(r"<!-- gpu-results\n(.*?)\n-->", re.S)

TITLES = {
    "routing_overhead": "Routing overhead",
    "routing_max_rel_error": "Routing max. relative error",
    "step_vs_floor": "Step vs floor",
    "speedup_vs_remerge": "Speed-up vs merge path",
    "pruning_cost_ratio": "Pruning cost ratio",
    "lambda0_cost_ratio": "lambda = 0 cost ratio",
    "adapter_memory_ratio": "Adapter memory ratio",
    "fusion_fraction": "Fusion share of a step",
    "model_calls_per_step": "Model calls per step",
    "hook_us_per_module": "Routing cost per module",
    "default_vs_paper_step": "Default method vs paper step",
    "default_step_vs_floor": "Default step vs its floor",
}

DEFINITIONS = {
    "routing_overhead": "routed UNet call, 2N·B rows, N=4 rank-16 LoRAs each on its own rows / the same call "
                        "with no adapters",
    "routing_max_rel_error": "max |routed − merged| / max |merged| over each LoRA's rows, merged = that LoRA "
                             "merged into the weights (float32)",
    "step_vs_floor": "full step (one routed call of (2N+2)·B rows: the base rows and every branch's, then "
                     "compose), N=4, λ=0.5 / one plain call of the same rows",
    "speedup_vs_remerge": "merge path (per branch: restore weights, merge that LoRA, call its 2B rows; N+1 "
                          "calls) / our step, N=4",
    "pruning_cost_ratio": "20-step pass, pool 8, top-k 2 probed every 5 steps / the same pass with all 8 "
                          "evaluated every step",
    "lambda0_cost_ratio": "step with λ=0 (no LoRA uncond rows) / step with λ=0.5, N=4",
    "adapter_memory_ratio": "bytes the router holds for N=4 rank-16 adapter sets / bytes of their factors as "
                            "loaded",
    "fusion_fraction": "compose alone (the shipped method and λ) at a 128x128 latent, N=4, B=2 / one step at that "
                       "size (see below)",
    "model_calls_per_step": "UNet calls of one composed denoiser evaluation (N=4, λ=0.5, B=2), counted through "
                            "the fake A1111's and the fake Forge's model; the larger of the two",
    "hook_us_per_module": "(routed call − plain call of the same 2N+2 rows) / routed modules, µs (CPU: the "
                          "measuring thread's CPU time); narrow SD1.5-layout UNet (32 channels, 32-wide text "
                          "context), 8x8 latent, B=1, N=4",
    "default_vs_paper_step": "the step with the shipped settings (method and λ of `Settings()`) / the paper's "
                             "step (λ=0.5), N=4: the shipped method runs the merged row too, 2N+4 evaluations "
                             "against 2N+2, so the target is their ratio",
    "default_step_vs_floor": "the step with the shipped settings, N=4 / one plain call of the same (2N+4)·B rows",
}


def loadavg() -> list[float] | None:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


CORE_FILES = ("fusion.py", "lora.py", "routing.py", "routing_jobs.py", "routing_stacks.py", "selection.py")
CORE_FILES_TEXT = "`loratorio/{" + ",".join(name.removesuffix(".py") for name in CORE_FILES) + "}.py`"


def core_digest() -> str:
    """Short hash of the core modules the suite measures, to tell results of different revisions apart."""
    h = hashlib.sha256()
    for name in CORE_FILES:
        path = Path(__file__).resolve().parent.parent / "loratorio" / name
        h.update(path.read_bytes() if path.exists() else b"")
    return h.hexdigest()[:12]


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on."""
    import diffusers

    info = {
        "cpu": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device.type,
        "device_name": cpu_model(),
        "loadavg_start": loadavg(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "core_digest": core_digest(),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def jsonable(value):
    """Plain JSON types (dataclasses to dicts, non-finite floats to None)."""
    if dataclasses.is_dataclass(value):
        return jsonable(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, torch.dtype):
        return str(value)
    return value


def fmt(key: str, value: float) -> str:
    if value is None:
        return "n/a"
    if key == "routing_max_rel_error":
        return f"{value:.1e}"
    if key == "fusion_fraction":
        return f"{value * 100:.2g} %"
    if key == "model_calls_per_step":
        return f"{value:g}"
    if key == "hook_us_per_module":
        return f"{value:.1f} µs"
    return f"{value:.3f}"


def fmt_bound(key: str, op: str, bound: float) -> str:
    if key == "routing_max_rel_error":
        return f"{op} {bound:.0e}"
    if key == "fusion_fraction":
        return f"{op} {bound * 100:g} %"
    if op == "~":
        return f"about {bound:.2f} (≤ {bound * 1.1:.2f})"
    if key == "hook_us_per_module":
        return f"{op} {bound:g} µs"
    return f"{op} {bound:g}"


def _range(result: dict, key: str) -> str:
    detail = result["detail"]
    if key == "hook_us_per_module" and "hook_cost" in detail:
        return f"{detail['hook_cost']['min']:.1f}–{detail['hook_cost']['max']:.1f} µs"
    if key == "model_calls_per_step" and "model_calls" in detail:
        return ", ".join(f"{host}: {calls:g}" for host, calls in detail["model_calls"].items())
    summary = detail["ratios"].get(key) or (detail["pruning"]["ratio"] if key == "pruning_cost_ratio" else None)
    if summary is None:
        return ""
    return f"{summary['min']:.3f}–{summary['max']:.3f}"


def table(result: dict) -> str:
    """Plain-text table for the terminal."""
    rows = [("metric", "measured", "range", "target", "met")]
    for key, target in result["targets"].items():
        rows.append((key, fmt(key, result[key]), _range(result, key), fmt_bound(key, target["op"], target["bound"]),
                     "yes" if target["met"] else "NO"))
    rows.append(("fusion_ms", f"{result['fusion_ms']:.2f} ms", "", "", ""))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    m = result["machine"]
    lines.append(f"\n{result['mode']} mode, {m['device_name']}, torch {m['torch']} ({m['torch_threads']} thread(s)), "
                 f"{result['seconds']:.0f} s")
    return "\n".join(lines)


def _md_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def cells(row):
        return "| " + " | ".join(c.replace("|", "\\|") for c in row) + " |"

    out = [cells(header), "|" + "|".join(" --- " for _ in header) + "|"]
    out += [cells(r) for r in rows]
    return out


def plot_sweep(sweeps: dict, path: Path, title: str, labels: dict[str, str]) -> Path:
    """Step cost against N for each swept model (one panel each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(sweeps), figsize=(6.4 * len(sweeps), 4.4), squeeze=False)
    for ax, (name, sweep) in zip(axes[0], sweeps.items()):
        ns, ms = sweep["ns"], sweep["median_ms"]
        series = [("remerge", "merge path (restore + merge + call per branch)", "tab:red", "s"),
                  ("step", "LoRAtorio step, λ = 0.5 (ours)", "tab:blue", "o"),
                  ("floor", "floor: one plain call of (2N+2)·B rows", "tab:gray", "^"),
                  ("step_lambda0", "LoRAtorio step, λ = 0 (ours)", "tab:green", "D")]
        for prefix, label, color, marker in series:
            ax.plot(ns, [ms[f"{prefix}_n{n}"] for n in ns], marker=marker, color=color, label=label)
        ax.axhline(ms["plain_cfg"], color="black", linestyle=":", label="plain CFG step, no LoRA composition")
        ax.set_xticks(ns)
        ax.set_xlabel("number of LoRAs N")
        ax.set_ylabel("wall time per denoising step (ms)")
        ax.set_ylim(bottom=0)
        ax.set_title(labels.get(name, name), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _sweep_rows(sweep: dict, per_second: bool) -> list[list[str]]:
    ms = sweep["median_ms"]
    rows = []
    for n in sweep["ns"]:
        cells = [ms[f"{p}_n{n}"] for p in ("step", "step_lambda0", "floor", "remerge")]
        shown = [f"{1e3 / v:.2f}" if per_second else f"{v:.0f}" for v in cells]
        rows.append([str(n), *shown, f"{cells[0] / cells[2]:.3f}", f"{cells[3] / cells[0]:.2f}"])
    plain = ms["plain_cfg"]
    rows.append(["plain CFG", f"{1e3 / plain:.2f}" if per_second else f"{plain:.0f}", "", "", "", "", ""])
    return rows


def _model_line(result: dict) -> str:
    s = result["setup"]
    c = s["model_config"]
    levels = len(c["block_out_channels"])
    return (f"`{s['model']}`: diffusers `UNet2DConditionModel`, block_out_channels {tuple(c['block_out_channels'])}, "
            f"layers_per_block {c['layers_per_block']}, cross_attention_dim {c['cross_attention_dim']}, "
            f"attention_head_dim {c['attention_head_dim']} ({levels} levels), random weights")


def call_cost(sweep: dict) -> tuple[float, float]:
    """Least-squares fit of a plain UNet call's time as ``fixed + per_row * rows`` (ms), from the sweep's floors.

    The floors (``(2N+2)·B`` rows) and plain CFG (``2B`` rows) are plain calls of different sizes,
    so the intercept is what a call costs whatever its rows (Python, kernel launches, small ops).
    """
    ms, b = sweep["median_ms"], sweep["batch"]
    points = [(2 * b, ms["plain_cfg"])] + [((2 * n + 2) * b, ms[f"floor_n{n}"]) for n in sweep["ns"]]
    mean_x = sum(x for x, _ in points) / len(points)
    mean_y = sum(y for _, y in points) / len(points)
    var = sum((x - mean_x) ** 2 for x, _ in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / var if var else 0.0
    return mean_y - slope * mean_x, slope


def _call_cost_note(sweep: dict, label: str, calls_per_step: float = 1.0) -> str:
    fixed, per_row = call_cost(sweep)
    calls = ("The step makes one call, as the floor does, so the fixed part is paid once; pruning and λ = 0 "
             "remove rows." if calls_per_step == 1 else
             "The step makes two calls (the host's base call and the routed branch call) where the floor makes "
             "one, and pruning and λ = 0 remove rows, not calls.")
    if fixed <= 0:
        return (f"- **Per-call cost ({label}).** The sweep's plain calls give no positive fixed part here "
                f"({fixed:.1f} ms + {per_row:.2f} ms per row, least-squares): the cost of a call follows its rows, "
                f"within this run's noise.")
    share = fixed / (fixed + per_row * 2 * sweep["batch"])
    return (f"- **Per-call cost ({label}).** A plain UNet call costs about {fixed:.1f} ms whatever its rows plus "
            f"{per_row:.2f} ms per row (least-squares fit over the sweep's plain calls): {share * 100:.0f} % of a "
            f"plain CFG call is the fixed part. {calls}")


def notes(result: dict) -> list[str]:
    """Generated explanations, from the measured numbers, of what each metric shows."""
    d = result["detail"]
    out = []
    flops = d.get("flops")
    if flops:
        out.append(
            f"- **Routing overhead.** The adapters' own arithmetic is {flops['adapter_share_of_unet'] * 100:.1f} % of "
            f"the UNet call's FLOPs ({flops['adapter_gflops']:.2f} of {flops['unet_gflops']:.1f} GFLOP; "
            f"{flops['adapter_share_of_targets'] * 100:.1f} % of the FLOPs of the targeted layers themselves): the "
            f"floor of this ratio where time follows FLOPs is {1 + flops['adapter_share_of_unet']:.3f}. Measured "
            f"{result['routing_overhead']:.3f}.")
    err = d["routing_error"]
    out.append(
        f"- **Routing error.** Each LoRA moves the UNet output by "
        f"{min(err['lora_effect_rel']) * 100:.1f}–{max(err['lora_effect_rel']) * 100:.1f} % of its largest value "
        f"(max |merged − base| / max |base|), so the error bound tests the adapters, not rounding of a no-op; "
        f"per LoRA: {', '.join(f'{e:.1e}' for e in err['per_lora'])}.")
    r = d["ratios"]
    out.append(
        f"- **Step vs floor.** The step also runs the routing and `compose`; plain CFG alone "
        f"(2B rows) is 1/{r['step_vs_plain_cfg']['median']:.2f} of the step, i.e. the composed step costs "
        f"{r['step_vs_plain_cfg']['median']:.2f}x a plain CFG step for N=4 (the row count alone gives "
        f"{(2 * result['setup']['n'] + 2) / 2:.0f}x). The step is one routed call: the branch rows ride in the "
        f"host's own model call. Where a host feature keeps them apart (A1111 with batch_cond_uncond off or "
        f"prompts of unequal token lengths, Forge with a ControlNet, another model-function wrapper or an AND "
        f"prompt, or a max-rows limit below the step's rows), the base call and a routed branch call cost "
        f"{r['step_two_calls_vs_floor']['median']:.3f}x the floor.")
    p = d["pruning"]
    out.append(
        f"- **Pruning.** Branches evaluated per step with pruning: {p['branches_per_step'].get('pruned')}; UNet rows "
        f"with pruning / without: {p['evaluation_ratio']:.3f}. The measured time ratio is that plus the per-call "
        f"costs that do not shrink with the rows (one UNet call and one compose per step either way).")
    n = result["setup"]["n"]
    out.append(
        f"- **λ = 0.** Rows per step go from 2N+2 to N+2 ({(n + 2) / (2 * n + 2):.2f} of them); "
        f"the λ=0 step against its own floor (one plain call of (N+2)·B rows): "
        f"{r['lambda0_step_vs_floor']['median']:.3f}.")
    calls = d.get("model_calls")
    if calls:
        out.append(
            f"- **Model calls per step.** A whole generation (N=4, λ=0.5, B=2, 3 steps) through the real script "
            f"and host modules on the fakes of both WebUIs (`tests/fake_a1111`, `tests/fake_forge`, which follow the "
            f"hosts' call protocol): UNet calls per denoiser evaluation "
            f"{', '.join(f'{h}: {c:g}' for h, c in calls.items())}. The base cond/uncond rows and every branch row "
            f"go through the host's own call (A1111: the CFG denoiser's batch; Forge: `calc_cond_uncond_batch`).")
    hook = d.get("hook_cost")
    if hook:
        before = "".join(
            f" Revision {base['revision']} ({base['what']}), measured in the same repetitions: "
            f"{base['hook_us_per_module']:.1f} µs per module (range {base['min']:.1f}–{base['max']:.1f})."
            for base in hook.get("baselines", ()))
        share = hook.get("adapter_flop_share")
        flops = (f" The adapters' arithmetic is {share * 100:.1f} % of the plain call's FLOPs: at the plain call's "
                 f"own rate it would take {share * hook['plain_ms'] * 1e3 / hook['modules']:.1f} µs per module."
                 if share is not None else "")
        alone = hook.get("alone")
        split = (f" Each routed module alone, on the input it had in that call ({alone['calls']} calls in a row, "
                 f"the least of {alone['rounds']} timings, plain, routed and dispatch-only alternating, caches "
                 f"warm): {alone['plain_us']:.1f} µs plain, {alone['extra_us']:.1f} µs more routed, of which "
                 f"{alone['dispatch_us']:.1f} µs is the dispatch (a router whose planned work is emptied: its routed "
                 f"forwards look their plans up and return) and {alone['work_us']:.1f} µs the adapters' matmuls and "
                 f"row views. The rest of the in-call figure is the same work with colder caches and the machine's "
                 f"other load." if alone else "")
        out.append(
            f"- **Routing cost per module.** A routed call of {hook['rows']} rows on the narrow SD1.5-layout UNet "
            f"({hook['modules']} routed modules) takes {hook['routed_ms']:.1f} ms against {hook['plain_ms']:.1f} ms "
            f"plain ({hook.get('clock', 'wall time')}): {result['hook_us_per_module']:.1f} µs per module. That is "
            f"the routed forward (set on each target for the call, no hook), the adapters' matmuls (one per module "
            f"where the factors' product is the cheaper form, as in most of this narrow model; two otherwise) and "
            f"the row views; each module's plan is made once per row layout and kept for the route block.{split}"
            f"{flops}{before}")
    mem = d["memory"]
    out.append(
        f"- **Memory.** The router holds {mem['router_nbytes'] / 2**20:.1f} MiB for factors of "
        f"{mem['factor_nbytes'] / 2**20:.1f} MiB (stacked per module for batched matmuls, plus one device/dtype copy "
        f"when the model's differs); a dense delta per LoRA would be the size of every targeted weight.")
    name = result["setup"]["model"]
    if name in result["sweeps"]:
        sweep = result["sweeps"][name]
        out.append(_call_cost_note(sweep, f"{name} at {sweep['latent']}x{sweep['latent']}",
                                   result.get("model_calls_per_step", 2.0)))
    f = d["fusion"]
    out.append(
        f"- **Fusion.** `compose` (N=4, B=2, 128x128, λ=0.5, denoised form) takes {result['fusion_ms']:.1f} ms "
        f"(median of {f['compose']['reps']}). The step it is divided by: {f['denominator']}. A UNet's work per row "
        f"grows at least with the latent's pixel count (convolutions and projections are per pixel, self-attention "
        f"grows faster) and with B, so this step is a lower bound and the share an upper bound.")
    return out


def _gpu_section(gpu: dict, images: Path, cpu_digest: str) -> tuple[list[str], list[Path]]:
    m = gpu["machine"]
    lines = ["", "## GPU", "",
             f"Measured on **{m['device_name']}** (CUDA {m.get('cuda')}, torch {m['torch']}), {m['date']}, with "
             f"`python bench/run.py --device cuda --out gpu.json` and folded into this page by "
             f"`--gpu-results gpu.json` (CPU-only runs keep it): bf16 weights and activations, B=1, random weights, "
             f"host CPU {m['cpu']} ({m['cpu_cores']} cores). Throughput in denoising steps per second (it/s). The "
             f"metrics are those of the CPU table, with SD1.5 at 64x64 and the fusion divided by a measured SDXL "
             f"step at 128x128, N=4, B=2.", ""]
    rows = []
    for key, target in gpu["targets"].items():
        rows.append([TITLES[key], fmt(key, gpu[key]), fmt_bound(key, target["op"], target["bound"]),
                     "yes" if target["met"] else "**no**"])
    lines += _md_table(["metric (SD1.5, 512x512, N=4)", "measured", "target", "met"], rows)
    digest = m.get("core_digest")
    if digest != cpu_digest:
        which = f"core revision {digest}" if digest else "a core revision this record does not name"
        lines += ["", f"These GPU figures were measured with {which}; the CPU figures above with {cpu_digest} "
                      f"(hash of {CORE_FILES_TEXT}). Changes to the routing since then "
                      f"are not reflected here until the GPU suite is run again."]
    labels = {"sd15": "SD1.5 UNet, 512x512 (64x64 latent), B=1", "sdxl": "SDXL UNet, 1024x1024 (128x128 latent), B=1"}
    for name, sweep in gpu["sweeps"].items():
        lines += ["", f"**{labels.get(name, name)}**, it/s (higher is better):", ""]
        lines += _md_table(["N", "ours λ=0.5", "ours λ=0", "floor", "merge path", "ours / floor (time)",
                            "merge / ours (time)"], _sweep_rows(sweep, per_second=True))
    variants = gpu["detail"]["variants"]
    routed_extra = variants["routed_branch_rows"]["median_ms"] - variants["plain_branch_rows"]["median_ms"]
    missed = [TITLES[k] for k, t in gpu["targets"].items() if not t["met"]]
    fixed, per_row = call_cost(gpu["sweeps"][gpu["setup"]["model"]])
    lines += ["", "Notes:", ""]
    if missed:
        lines += [f"- **Missed here: {', '.join(missed)}.** These targets assume that a call costs in proportion "
                  f"to its rows. At B=1 on this GPU it does not: an SD1.5 call costs {fixed:.1f} ms whatever its "
                  f"rows and {per_row:.2f} ms per row, because the GPU finishes each kernel sooner than Python on the "
                  f"CPU can issue the next one. What counts there is the number of calls and kernel launches: the "
                  f"step's two calls against the floor's one, Python per routed module, and the same two calls per "
                  f"step whether 2 or 8 branches run. The merge path, with N+1 calls and N merges, is still "
                  f"{gpu['speedup_vs_remerge']:.1f}x slower than the step."]
    lines += [
              "- The routing error is measured in float32 with TF32 off, before the model is cast to bf16.",
              f"- Routing adds {routed_extra:.1f} ms to a {variants['plain_branch_rows']['median_ms']:.1f} ms call "
              f"of {2 * gpu['setup']['n']} rows: at B=1 the time of a call is set by how fast the CPU issues its "
              f"kernels, and every routed module adds a Python forward and a few small kernels.",
              *(_call_cost_note(sweep, labels.get(name, name), gpu.get("model_calls_per_step", 2.0))
                for name, sweep in gpu["sweeps"].items()),
              "", "![GPU step cost against N](images/bench_step_cost_gpu.png)"]
    plot = plot_sweep(gpu["sweeps"], images / "bench_step_cost_gpu.png", f"Step cost on {m['device_name']} (bf16)",
                      labels)
    lines += ["", "<!-- gpu-results", json.dumps(gpu, separators=(",", ":")), "-->"]
    return lines, [plot]


def write_docs(result: dict, docs: Path, *, gpu: dict | None = None, command: str | None = None) -> list[Path]:
    """Regenerate ``docs/benchmarks.md`` and its plot(s) from ``result`` (and GPU results, if any)."""
    md_path = docs / "benchmarks.md"
    images = docs / "images"
    if gpu is None and md_path.exists():
        found = GPU_BLOCK.search(md_path.read_text())
        gpu = json.loads(found.group(1)) if found else None
    m, s = result["machine"], result["setup"]
    command = command or " ".join(["python bench/run.py", *(["--quick"] if result["mode"] == "quick" else [])])
    labels = {s["model"]: f"{s['model']} at {s['sweep_latent']}x{s['sweep_latent']} latent, B={s['batch']}"}
    plot = plot_sweep(result["sweeps"], images / "bench_step_cost.png",
                      f"Step cost against N on CPU ({m['cpu']}, {m['torch_threads']} thread"
                      f"{'s' if m['torch_threads'] != 1 else ''})", labels)
    spreads = {k: v["spread"] for k, v in result["detail"]["variants"].items()}
    worst = max(spreads, key=spreads.get)

    lines = [
        "# Benchmarks",
        "",
        f"Generated by `{command}` ({result['mode']} mode) on {m['date']}; the script rewrites this page and its "
        f"plot, so do not edit them by hand.",
        "",
        "Each ratio compares variants measured side by side: within every repetition the variants run one after "
        "another in a rotating order, after a warm-up round, and the value is the median of the per-repetition "
        "ratios (range: lowest–highest). No weights are downloaded: the UNets are built from the published configs "
        "with random weights, which have the real shapes and FLOPs.",
        "",
    ]
    rows = []
    for key, target in result["targets"].items():
        rows.append([TITLES[key], DEFINITIONS[key], fmt(key, result[key]), _range(result, key),
                     fmt_bound(key, target["op"], target["bound"]), "yes" if target["met"] else "**no**"])
    lines += _md_table(["metric", "what is divided by what", "measured", "range", "target", "met"], rows)
    lines += ["", f"`fusion_ms`: {result['fusion_ms']:.2f} ms (compose alone, 128x128, N=4, B=2).", ""]

    lines += ["## Machine", "",
              f"- CPU: {m['cpu']}, {m['cpu_cores']} logical cores; torch {m['torch']} with {m['torch_threads']} "
              f"thread(s) (fixed by the script, `--threads`); diffusers {m['diffusers']}; Python {m['python']}.",
              f"- Load average (1, 5, 15 min) at the start: {m['loadavg_start']}, at the end: {m.get('loadavg_end')}. "
              f"The machine was shared with other work: the noisiest variant ({worst}) spread "
              f"{spreads[worst] * 100:.0f} % between its fastest and slowest repetition; the median spread was "
              f"{sorted(spreads.values())[len(spreads) // 2] * 100:.0f} %.",
              f"- Whole run: {result['seconds'] / 60:.1f} min; core revision {m['core_digest']} (hash of "
              f"{CORE_FILES_TEXT}).", ""]

    lines += ["## Setup", "",
              f"- Model: {_model_line(result)}.",
              f"- LoRAs: rank {s['rank']}, random factors on kohya's default SD targets (every Linear and 1x1 Conv2d "
              f"inside the transformer blocks: proj_in/proj_out, attention to_q/to_k/to_v/to_out.0, feed-forward), "
              f"built with `loratorio.lora.LowRank`, routed with `loratorio.routing.Router`.",
              f"- Main measurements: latent {s['latent']}x{s['latent']}, B={s['batch']}, N={s['n']}, "
              f"λ={s['recenter']}, "
              f"{s['reps']} repetition(s) after {s['warmup']} warm-up round(s); `torch.inference_mode()`.",
              f"- Pruning: pool {s['pool']}, top-k {s['prune']['top_k']}, probe every {s['prune']['probe_every']}, "
              f"{s['prune']['steps']} steps, latent {s['prune_latent']}x{s['prune_latent']}, {s['prune_reps']} "
              f"repetition(s) of each pass (`loratorio.selection.ProbePolicy` picking the branches, `compose` "
              f"with top-k 2).",
              "- Merge path: per branch, copy every target weight back from a backup, add that LoRA's "
              "`delta_weight` (computed from its factors, as WebUI's merge does), call the UNet on that branch's "
              "cond/uncond rows; the base rows after a restore.",
              ""]

    lines += ["## Step cost against the number of LoRAs", "",
              f"![Step cost against N](images/{plot.name})", "",
              f"{labels[s['model']]}, wall time per step in ms (median of {s['sweep_reps']}):", ""]
    lines += _md_table(["N", "ours λ=0.5", "ours λ=0", "floor", "merge path", "ours / floor", "merge / ours"],
                       _sweep_rows(result["sweeps"][s["model"]], per_second=False))

    lines += ["", "## Notes", "", *notes(result)]

    lines += ["", "## Variants (main measurement)", ""]
    vrows = [[k, f"{v['median_ms']:.1f}", f"{v['min_ms']:.1f}", f"{v['max_ms']:.1f}", f"{v['spread'] * 100:.0f} %"]
             for k, v in result["detail"]["variants"].items()]
    lines += _md_table(["variant", "median ms", "min ms", "max ms", "spread"], vrows)

    paths = [plot]
    if gpu is not None:
        gpu_lines, gpu_paths = _gpu_section(gpu, images, m["core_digest"])
        lines += gpu_lines
        paths += gpu_paths
    else:
        lines += ["", "## GPU", "", "No GPU results recorded yet: run `python bench/run.py --device cuda --out "
                  "gpu.json` on a CUDA machine, then `python bench/run.py --quick --gpu-results gpu.json` here."]
    lines += ["", "## Reproduce", "", "```",
              "python bench/run.py --quick         # SD1.5's first two levels, about 4 min on a 2-core CPU",
              "python bench/run.py                 # SD1.5's whole UNet, about half an hour",
              "python bench/run.py --quick --json  # one JSON object instead of the table",
              "python bench/run.py --device cuda --out gpu.json   # the GPU suite (SD1.5 and SDXL, bf16)",
              "python bench/run.py --quick --gpu-results gpu.json # fold GPU results into this page",
              "```", ""]
    md_path.write_text("\n".join(lines))
    return [md_path, *paths]
