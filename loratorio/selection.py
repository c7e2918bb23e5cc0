"""Dynamic module selection across steps: which LoRAs to evaluate at the next step.

Top-k gating inside :func:`loratorio.fusion.compose` (method step 5) decides per patch
and step which LoRAs act, but it still needs every candidate's prediction. With a pool
of M candidates and ``top_k = k`` that is M branch evaluations per step for k winners.

:class:`ProbePolicy` cuts that cost without changing what the method computes on the
steps it probes:

- ``probe_every = 1`` (default): every step is a probe; all candidates are evaluated and
  the result is exactly the paper's per-step top-k gating.
- ``probe_every = r > 1``: steps ``0, r, 2r, ...`` (of each sampling pass) are probes,
  where all candidates run and compose's per-patch top-k picks the winners. On the
  ``r - 1`` steps in between only the ``k`` candidates that carried the most weight at
  the last probe run; the others get weight 0 until the next probe.

Why this keeps the method where it matters: the weights change slowly from one step to
the next (the prediction of each branch is smooth in the noise level, and the
temperature only sharpens), so the winners of a probe are the winners of the steps just
after it. Which concept owns which region is settled in the first, high-noise steps,
and every pass starts with a probe at step 0. Between probes, a patch whose winner was
outside the kept set is shared by the kept LoRAs by the same SoftMin rule. Pool of 8,
top-k 2, probe every 5 runs 2 branches on 4 of every 5 steps.
"""

from __future__ import annotations

import torch

__all__ = ["ProbePolicy"]


class ProbePolicy:
    """Decides, step by step, which of ``n`` candidate LoRAs are evaluated."""

    def __init__(self, n: int, top_k: int = 0, probe_every: int = 1):
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n!r}")
        if top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {top_k!r}")
        if probe_every < 1:
            raise ValueError(f"probe_every must be >= 1, got {probe_every!r}")
        self.n, self.top_k, self.probe_every = n, top_k, probe_every
        self._kept: list[int] | None = None

    @property
    def prunes(self) -> bool:
        """True when some steps evaluate fewer than all candidates."""
        return self.probe_every > 1 and 0 < self.top_k < self.n

    def is_probe(self, step: int) -> bool:
        return not self.prunes or self._kept is None or step % self.probe_every == 0

    def active(self, step: int) -> list[int]:
        """Indices (ascending) of the candidates to evaluate at ``step`` of the current pass."""
        if self.is_probe(step):
            return list(range(self.n))
        return list(self._kept)

    def observe(self, step: int, active: list[int], weights: torch.Tensor) -> None:
        """Record a step's composition weights (``[len(active), B, 1, H, W]``, rows in ``active`` order).

        Only probes (all candidates evaluated) change the kept set: the ``top_k`` with the
        largest total weight, ties broken by candidate order.
        """
        if not self.prunes or len(active) != self.n:
            return
        mass = weights.detach().float().flatten(1).sum(1).cpu()
        order = sorted(range(self.n), key=lambda i: (-mass[i].item(), i))
        self._kept = sorted(active[i] for i in order[: self.top_k])

    def reset(self) -> None:
        """A new sampling pass (e.g. hires fix) starts with a probe."""
        self._kept = None
