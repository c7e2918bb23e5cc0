"""Fixed cost of routing per routed module, where fixed costs dominate.

On a narrow SD1.5-layout UNet (every level and the text context 32 wide, so each
module's arithmetic is tiny) at an 8x8 latent, B = 1, N = 4: one *routed* call of the composed step's rows
(``2N + 2`` rows: the base cond/uncond rows unrouted, each LoRA's cond/uncond rows routed
to it) against one *plain* call of the same rows. The difference divided by the number
of routed modules is what a routed module adds to a call: hook dispatch, row bookkeeping
and the adapters' kernel launches. Measured side by side (paired per repetition).

On a shared machine that difference is a few percent of a call whose time drifts by more,
so :func:`split` also takes every routed module alone, on the input one routed call gave
it, in tight loops (the least of several timings, caches warm): plain, routed, and routed
by a router whose planned work is emptied (:func:`dispatch_only`). That splits a module's
extra time into the dispatch (the routed forward looking its plans up) and the adapters'
own work (their matmuls and row views).

Earlier routings (the revisions in :data:`BASELINES`, read from this repository's git
history when there is one) are measured in the same repetitions, so the values are side
by side.
"""

from __future__ import annotations

import importlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from loratorio.routing import Router

from . import _model, _timing
from ._workload import Workload

MODEL = "sd15-narrow"
LATENT = 8
BATCH = 1
N = 4
RANK = 16
# earlier routings measured side by side: revision -> what it did per routed module
BASELINES = {
    "8d67308": "one forward hook per module planning its work at every call",
    "c7858c0": "one forward hook per module with its plan kept; a handle and closures made per call",
}
ROOT = Path(__file__).resolve().parent.parent


def baseline_router(revision: str):
    """``Router`` of ``loratorio/routing.py`` (and the routing modules beside it, where it has them) at
    ``revision``, or None without git history. It is loaded as a package of its own that uses today's
    adapter types."""

    def show(path: str) -> str | None:
        try:
            return subprocess.run(["git", "-C", str(ROOT), "show", f"{revision}:{path}"], capture_output=True,
                                  text=True, check=True, timeout=30).stdout
        except (OSError, subprocess.SubprocessError):
            return None

    routing = show("loratorio/routing.py")
    if routing is None:
        return None
    package = Path(tempfile.mkdtemp(prefix="loratorio-routing-")) / f"_routing_{revision}"
    package.mkdir()
    (package / "__init__.py").write_text("")
    for name in ("routing.py", "routing_jobs.py", "routing_stacks.py"):
        text = routing if name == "routing.py" else show(f"loratorio/{name}")
        if text is not None:
            (package / name).write_text(text.replace("from .lora import", "from loratorio.lora import"))
    sys.path.insert(0, str(package.parent))
    try:
        return importlib.import_module(f"{package.name}.routing").Router
    finally:
        sys.path.remove(str(package.parent))
        shutil.rmtree(package.parent, ignore_errors=True)


def routed_rows(work: Workload, n: int) -> list[slice | None]:
    """Router rows of the one-call layout: block 0 (base cond + uncond) unrouted, block ``j + 1`` LoRA ``j``."""
    per = 2 * work.batch
    rows: list[slice | None] = [None] * len(work.adapters)
    for j in range(n):
        rows[j] = slice((j + 1) * per, (j + 2) * per)
    return rows


def dispatch_only(router) -> None:
    """Empty the work ``router`` has planned, so its routed forwards dispatch and return (benchmark only).

    Call it after one routed call of the row layout to measure: that call made each
    module's schedule, which is kept per layout and is what later calls look up. Reads the
    router's plans (internal to the routing); the outputs are then the plain model's.
    """
    for plan in router._plans:
        for jobs in plan._schedules.values():
            jobs.clear()


def split(model, router, adapters, args, rows, *, sync=lambda: None, clock=time.thread_time,
          calls: int = 40, rounds: int = 5) -> dict:
    """Every routed module alone: µs per module (mean over the modules) plain, routed, and routed with no work.

    Each module runs on the input it got in one routed call, ``calls`` times in a row per
    timing; the three variants alternate, module by module, and the least of ``rounds``
    timings of each is kept (noise only adds time). ``dispatch`` is the emptied router's
    excess over plain, ``work`` the routed excess over the emptied router's: what the
    adapters' matmuls and row views cost with the caches warm.
    """
    inputs: list[tuple] = []
    handles = [m.register_forward_pre_hook(lambda mod, a, kw: inputs.append((mod, a, kw)), with_kwargs=True)
               for m in router.modules]
    try:
        with router.route(rows):
            model(*args)
    finally:
        for handle in handles:
            handle.remove()
    emptied = Router(model.targets, adapters)
    with emptied.route(rows):
        model(*args)
    dispatch_only(emptied)

    around = {"routed": lambda: router.route(rows), "dispatch": lambda: emptied.route(rows)}
    sums = dict.fromkeys(("plain", *around), 0.0)
    for module, a, kw in inputs:
        def calls_of(module=module, a=a, kw=kw):
            for _ in range(calls):
                module(*a, **kw)

        samples = _timing.interleaved(dict.fromkeys(sums, calls_of), reps=rounds, warmup=1, sync=sync, clock=clock,
                                      around=around)
        for name, sample in samples.items():
            sums[name] += min(sample.seconds) / calls * 1e6
    n = len(inputs)
    plain, routed, dispatch = sums["plain"], sums["routed"], sums["dispatch"]
    return {"plain_us": plain / n, "routed_us": routed / n, "dispatch_us": (dispatch - plain) / n,
            "work_us": (routed - dispatch) / n, "extra_us": (routed - plain) / n, "modules": n,
            "calls": calls, "rounds": rounds}


def measure(*, reps: int, warmup: int = 2, sync=lambda: None, device: str | torch.device = "cpu",
            inner: int = 5, with_baseline: bool = True) -> dict:
    """``hook_us_per_module`` with its side-by-side samples (``inner`` calls per timed sample)."""
    model = _model.build(MODEL, device=device)
    adapters = _model.make_adapters(model.targets, N, rank=RANK, device=device)
    work = Workload(model, adapters, batch=BATCH, latent=LATENT)
    args = work.inputs(N + 1, True)
    rows = routed_rows(work, N)

    def plain():
        for _ in range(inner):
            model(*args)

    def routed_with(router):
        def routed():
            for _ in range(inner):
                with router.route(rows):
                    model(*args)

        return routed

    variants = {"plain": plain, "routed": routed_with(work.router)}
    baselines = {}
    for revision in (BASELINES if with_baseline else ()):
        router = baseline_router(revision)
        if router is not None:
            baselines[revision] = router
            variants[f"routed_{revision}"] = routed_with(router(model.targets, adapters))
    # On a CPU the work is this thread's: its CPU time leaves out the time other processes take the
    # core (the machine is shared); on an accelerator the call's wall time is what counts.
    clock = time.thread_time if torch.device(device).type == "cpu" else time.perf_counter
    samples = _timing.interleaved(variants, reps=reps, warmup=warmup, sync=sync, clock=clock)
    modules = len(work.router.modules)

    def per_module(name: str) -> list[float]:
        return [(r - p) / inner / modules * 1e6
                for r, p in zip(samples[name].seconds, samples["plain"].seconds, strict=True)]

    diffs = per_module("routed")
    out = {
        "hook_us_per_module": statistics.median(diffs),
        "min": min(diffs),
        "max": max(diffs),
        "modules": modules,
        "alone": split(model, work.router, adapters, args, rows, sync=sync, clock=clock),
        "plain_ms": samples["plain"].median / inner * 1e3,
        "routed_ms": samples["routed"].median / inner * 1e3,
        "rows": int(args[0].shape[0]),
        "clock": "thread CPU time" if clock is time.thread_time else "wall time",
        "adapter_flop_share": _adapter_flop_share(model, work.router, args, rows),
        "setup": {"model": MODEL, "latent": LATENT, "batch": BATCH, "n": N, "rank": RANK, "reps": reps,
                  "calls_per_sample": inner},
    }
    out["baselines"] = []
    for revision in baselines:
        before = per_module(f"routed_{revision}")
        out["baselines"].append({"revision": revision, "what": BASELINES[revision],
                                 "hook_us_per_module": statistics.median(before), "min": min(before),
                                 "max": max(before),
                                 "routed_ms": samples[f"routed_{revision}"].median / inner * 1e3})
    return out


def _adapter_flop_share(model, router, args, rows) -> float:
    """Extra FLOPs of the routed call over the plain one, as a share of the plain call's."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as plain:
        model(*args)
    with FlopCounterMode(display=False) as routed, router.route(rows):
        model(*args)
    return (routed.get_total_flops() - plain.get_total_flops()) / plain.get_total_flops()


if __name__ == "__main__":
    import json
    import sys

    torch.set_num_threads(1)
    with torch.inference_mode():
        print(json.dumps(measure(reps=int(sys.argv[1]) if len(sys.argv) > 1 else 15), indent=1))
