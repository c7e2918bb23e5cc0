"""The two ways to form a low-rank linear delta for m adapters on their own row blocks, timed side by side.

``x [m, n, c]`` (each adapter's rows), ``down_t [m, c, r]``, ``up_t [m, r, o]``,
``out [m, n, o] += x @ down_t @ up_t``:

- ``rows first``: ``bmm(x, down_t)`` (an ``[n, r]`` output: r columns wide), then
  ``baddbmm_`` into the output;
- ``transposed``: ``bmm(down, x^T)`` (an ``[r, n]`` output: n columns wide), read
  transposed by the ``baddbmm_``; what :mod:`loratorio.routing_jobs` uses on a CPU at
  ranks up to ``_NARROW_RANK``.

The same, for the merged row (all m adapters on the same rows, their deltas summed):
``rows first`` is a matmul into ``[m, n, r]``, a permuted copy and one ``addmm_``; the
``transposed`` form, what the shared job uses, is one matmul into ``[m * r, n]`` and one
``addmm_`` with no copy.

Run: ``python -m bench.rank_forms`` (one CPU thread; prints one JSON object: per shape,
the median microseconds of each form over interleaved repetitions and their ratio).
"""

from __future__ import annotations

import json
import time

import torch

from bench import _timing

# (rows n, in c, rank r, out o): narrow layers of the hook-cost model and SD1.5-width ones
SHAPES = [(128, 32, 2, 32), (128, 32, 4, 32), (128, 32, 8, 32), (128, 32, 16, 32),
          (1024, 320, 4, 320), (1024, 320, 8, 320), (1024, 320, 16, 320), (1024, 320, 64, 320),
          (77, 768, 16, 320)]
M = 4


def _forms(n: int, c: int, r: int, o: int):
    x = torch.randn(M, n, c)
    down_t, up_t = torch.randn(M, c, r), torch.randn(M, r, o)
    down = down_t.transpose(1, 2)
    out = torch.zeros(M, n, o)
    xr, shared_out, up_flat = x[0], out[0], up_t.reshape(M * r, o)
    inner = max(1, 20_000 // (n * c))  # calls per timed sample, so that small shapes are not all timer

    def repeat(f):
        def run():
            for _ in range(inner):
                f()
        return run

    per_adapter = {
        "rows first": repeat(lambda: out.baddbmm_(torch.bmm(x, down_t), up_t)),
        "transposed": repeat(lambda: out.baddbmm_(torch.bmm(down, x.transpose(1, 2)).transpose(1, 2), up_t)),
    }
    shared = {
        "rows first": repeat(lambda: shared_out.addmm_(
            torch.matmul(xr, down_t).permute(1, 0, 2).reshape(-1, M * r), up_flat)),
        "transposed": repeat(lambda: shared_out.addmm_(torch.matmul(down, xr.T).view(M * r, -1).T, up_flat)),
    }
    return per_adapter, shared, inner


def measure(reps: int = 15) -> dict:
    torch.set_num_threads(1)
    results = []
    with torch.inference_mode():
        for n, c, r, o in SHAPES:
            per_adapter, shared, inner = _forms(n, c, r, o)
            row = {"n": n, "c": c, "r": r, "o": o, "adapters": M}
            for label, variants in (("per_adapter", per_adapter), ("shared", shared)):
                samples = _timing.interleaved(variants, reps=reps, warmup=2, clock=time.thread_time)
                first, transposed = (samples[k].median / inner * 1e6 for k in ("rows first", "transposed"))
                row[label] = {"rows_first_us": round(first, 1), "transposed_us": round(transposed, 1),
                              "transposed_over_rows_first": round(transposed / first, 3)}
            results.append(row)
    return {"threads": 1, "torch": torch.__version__, "shapes": results}


if __name__ == "__main__":
    print(json.dumps(measure(), indent=1))
