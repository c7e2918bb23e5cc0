"""Side-by-side timing: variants interleaved in one loop, warm-up first, medians reported.

On a shared or throttling machine the speed drifts over seconds. Timing variant A for a
minute and then B for a minute puts that drift into the A/B ratio; running A and B
alternately in the same repetition (in a rotating order) and taking the median of the
per-repetition ratios cancels most of it.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch


def synchronizer(device: torch.device) -> Callable[[], None]:
    """A function that waits for queued device work (GPU kernels run asynchronously)."""
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@dataclass
class Samples:
    """Wall times (seconds) of one variant, one per repetition."""

    name: str
    seconds: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the repetitions were (0.05 = 5 %)."""
        return (max(self.seconds) - min(self.seconds)) / self.median if self.median > 0 else 0.0

    def summary(self) -> dict:
        return {"median_ms": self.median * 1e3, "min_ms": min(self.seconds) * 1e3, "max_ms": max(self.seconds) * 1e3,
                "spread": self.spread, "reps": len(self.seconds)}


@dataclass
class Ratio:
    """Median of the per-repetition ratios ``a_i / b_i``, with their range."""

    value: float
    low: float
    high: float
    reps: int

    def summary(self) -> dict:
        return {"median": self.value, "min": self.low, "max": self.high, "reps": self.reps}


def interleaved(variants: dict[str, Callable[[], object]], *, reps: int, warmup: int = 1,
                sync: Callable[[], None] = lambda: None,
                clock: Callable[[], float] = time.perf_counter,
                around: dict[str, Callable[[], contextlib.AbstractContextManager]] | None = None) -> dict[str, Samples]:
    """Time every variant ``reps`` times, the variants alternating within each repetition.

    ``warmup`` rounds of every variant run first and are not recorded (allocator, caches,
    first-call setup such as device copies of adapter weights). The order of the variants
    rotates from one repetition to the next so none always runs first or last. ``clock``:
    wall time by default; ``time.thread_time`` counts only the CPU time of the measuring
    thread (single-threaded CPU work on a machine shared with other processes).
    ``around``: per variant, a context every run of it is made inside, entered and left
    outside the timing (e.g. a route block around calls of one module).
    """
    names = list(variants)
    around = around or {}

    def context(name: str) -> contextlib.AbstractContextManager:
        return around[name]() if name in around else contextlib.nullcontext()

    for _ in range(warmup):
        for name in names:
            with context(name):
                variants[name]()
    sync()
    samples = {name: Samples(name, []) for name in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            with context(name):
                sync()
                start = clock()
                variants[name]()
                sync()
                samples[name].seconds.append(clock() - start)
    return samples


def ratio(samples: dict[str, Samples], a: str, b: str) -> Ratio:
    """``a / b`` paired by repetition (both timed in the same repetition)."""
    pairs = [x / y for x, y in zip(samples[a].seconds, samples[b].seconds)]
    return Ratio(statistics.median(pairs), min(pairs), max(pairs), len(pairs))
