"""Per-generation composer: selection, fusion and bookkeeping for one generation.

Host adapters create one :class:`Composer` per generation, keep it on the processing
object, and call it at every denoising step:

1. ``active = composer.active(step)``: the branches to evaluate (selection policy);
2. run those branches (their cond rows, and uncond rows when ``composer.needs_uncond``);
3. ``res = composer.fuse(...)``: the fused cond/uncond to hand to the host's CFG.

The composer drops branches whose predictions are not finite for that step (reported in
:attr:`Composer.dropped`), feeds the selection policy, and averages the weights over the
steps for the composition map. It holds no model and imports no host code.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F

from .fusion import Composition, compose
from .selection import ProbePolicy

__all__ = ["Composer"]


class Composer:
    """Fuses the branches named ``names`` step by step (method steps 1-8, plus selection)."""

    def __init__(self, names: list[str], *, recenter: float = 0.5, temperature_scale: float = 10.0,
                 patch_size: int = 2, top_k: int = 0, probe_every: int = 1, record_map: bool = False):
        if not names:
            raise ValueError("Composer needs at least one LoRA branch")
        self.names = list(names)
        self.recenter, self.temperature_scale = recenter, temperature_scale
        self.patch_size, self.top_k = patch_size, top_k
        self.policy = ProbePolicy(len(names), top_k=top_k, probe_every=probe_every)
        self.record_map = record_map
        self.dropped: Counter[str] = Counter()
        self.base_nonfinite = 0  # calls whose base prediction itself was NaN/inf
        self.calls = 0
        self.branch_evaluations = 0
        self._map_sum: torch.Tensor | None = None
        self._map_steps = 0

    @property
    def needs_uncond(self) -> bool:
        """Whether LoRA uncond predictions are used (re-centring on)."""
        return self.recenter > 0

    def active(self, step: int) -> list[int]:
        """Branch indices to evaluate at ``step`` (0-based step of the current pass)."""
        return self.policy.active(step)

    def new_pass(self) -> None:
        """A new sampling pass (hires fix): steps restart at 0 and selection re-probes."""
        self.policy.reset()

    def fuse(self, *, step: int, active: list[int], base_cond: torch.Tensor, lora_cond: torch.Tensor,
             base_uncond: torch.Tensor | None = None, lora_uncond: torch.Tensor | None = None,
             x: torch.Tensor | None = None) -> Composition:
        """Fuse the ``active`` branches for one model call.

        ``lora_cond``/``lora_uncond`` are ``[len(active), B, C, H, W]`` in ``active`` order,
        denoised estimates when ``x`` is given, noise-like otherwise (see
        :func:`loratorio.fusion.compose`). ``lora_uncond`` is needed only when
        :attr:`needs_uncond` and ``base_uncond`` is given. The returned weights cover all
        branches, ``[N, B, 1, H, W]``, zero for branches not evaluated or dropped.
        """
        if len(active) != lora_cond.shape[0]:
            raise ValueError(f"active names {len(active)} branches but lora_cond holds {lora_cond.shape[0]}")
        use_uncond = base_uncond is not None and self.needs_uncond
        if use_uncond and lora_uncond is None:
            raise ValueError("lora_uncond is required when re-centring is on and base_uncond is given")
        self.calls += 1
        self.branch_evaluations += len(active)
        batch, _, height, width = base_cond.shape
        full = torch.zeros(len(self.names), batch, 1, height, width, device=base_cond.device)
        if not self._finite(base_cond, base_uncond):
            # The model diverged on its own (too high a CFG scale, a broken checkpoint):
            # the branches are not to blame, and there is nothing sound to compose against.
            self.base_nonfinite += 1
            return Composition(cond=base_cond, uncond=base_uncond, weights=full)
        keep = [i for i in range(len(active)) if self._finite(lora_cond[i], lora_uncond[i] if use_uncond else None)]
        for i in set(range(len(active))) - set(keep):
            self.dropped[self.names[active[i]]] += 1
        if not keep:
            # Nothing usable this step: the base prediction is the safe answer.
            return Composition(cond=base_cond, uncond=base_uncond, weights=full)
        index = torch.tensor(keep, device=lora_cond.device)
        top_k = self.top_k if 0 < self.top_k < len(keep) else 0
        res = compose(
            base_cond, lora_cond.index_select(0, index),
            base_uncond, lora_uncond.index_select(0, index) if use_uncond else None,
            step=step, x=x, patch_size=self.patch_size, temperature_scale=self.temperature_scale,
            recenter=self.recenter if base_uncond is not None else 0.0, top_k=top_k,
        )
        kept = [active[i] for i in keep]
        full[kept] = res.weights.to(full.device)
        self.policy.observe(step, kept, res.weights)
        if self.record_map:
            self._record(full)
        return Composition(cond=res.cond, uncond=res.uncond, weights=full)

    @staticmethod
    def _finite(cond: torch.Tensor, uncond: torch.Tensor | None) -> bool:
        return bool(torch.isfinite(cond).all()) and (uncond is None or bool(torch.isfinite(uncond).all()))

    def _record(self, weights: torch.Tensor) -> None:
        maps = weights[:, :, 0].float().cpu()
        if self._map_sum is not None and self._map_sum.shape != maps.shape:
            if self._map_sum.shape[:2] == maps.shape[:2]:
                # A hires pass: carry the earlier steps over at the new resolution.
                self._map_sum = F.interpolate(self._map_sum, size=maps.shape[-2:], mode="nearest")
            else:
                self._map_sum, self._map_steps = None, 0
        self._map_sum = maps if self._map_sum is None else self._map_sum + maps
        self._map_steps += 1

    def mean_weights(self) -> torch.Tensor | None:
        """Weights averaged over the recorded calls, ``[N, B, H, W]`` (None before any)."""
        if self._map_sum is None:
            return None
        return self._map_sum / self._map_steps
