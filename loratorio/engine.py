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

from .fusion import Composition, compose, method_options
from .selection import ProbePolicy

__all__ = ["Composer", "host_flags"]


def host_flags(flags: torch.Tensor) -> list[bool]:
    """The one device-to-host read of a composed step: a 1-D bool tensor as Python bools."""
    return [bool(v) for v in flags.tolist()]


def _on_device(indices: list[int], device: torch.device) -> torch.Tensor:
    """An index tensor on ``device`` without waiting for the device's queue (a plain copy of a list would)."""
    return torch.tensor(indices, dtype=torch.long).to(device, non_blocking=True)


class Composer:
    """Fuses the branches named ``names`` step by step (method steps 1-8, plus selection)."""

    def __init__(self, names: list[str], *, recenter: float = 0.5, temperature_scale: float = 10.0,
                 patch_size: int = 2, top_k: int = 0, probe_every: int = 1, record_map: bool = False,
                 method: str = "paper"):
        if not names:
            raise ValueError("Composer needs at least one LoRA branch")
        self.names = list(names)
        self.method = method
        self.fusion_options = method_options(method)
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

    @classmethod
    def from_settings(cls, names: list[str], settings, *, record_map: bool | None = None) -> Composer:
        """The composer a generation with ``settings`` (a :class:`loratorio.settings.Settings`) uses.

        The one constructor hosts and benchmarks share, so what a benchmark measures is
        what a user gets. ``record_map`` defaults to ``settings.composition_map``.
        """
        return cls(names, recenter=settings.recenter, temperature_scale=settings.temperature_scale,
                   patch_size=settings.patch_size, top_k=settings.top_k, probe_every=settings.probe_every,
                   record_map=settings.composition_map if record_map is None else record_map,
                   method=settings.method)

    @property
    def needs_uncond(self) -> bool:
        """Whether LoRA uncond predictions are used (re-centring on)."""
        return self.recenter > 0

    def needs_merged(self, active: list[int]) -> bool:
        """Whether a step with the ``active`` branches needs the merged row: every LoRA applied at once to
        one copy of the base rows (method ``joint``).

        Only when every branch is evaluated: the merged row's text comes from every LoRA's
        text encoder once per pass, and a top-k pool's steps between probes evaluate a
        subset (they fuse as ``resolve``). With one branch the merged row is that branch.
        """
        return self.fusion_options.get("joint", 0) > 0 and len(active) == len(self.names) > 1

    def active(self, step: int) -> list[int]:
        """Branch indices to evaluate at ``step`` (0-based step of the current pass)."""
        return self.policy.active(step)

    def new_pass(self) -> None:
        """A new sampling pass (hires fix): steps restart at 0 and selection re-probes."""
        self.policy.reset()

    def fuse(self, *, step: int, active: list[int], base_cond: torch.Tensor, lora_cond: torch.Tensor,
             base_uncond: torch.Tensor | None = None, lora_uncond: torch.Tensor | None = None,
             x: torch.Tensor | None = None, merged_cond: torch.Tensor | None = None,
             merged_uncond: torch.Tensor | None = None) -> Composition:
        """Fuse the ``active`` branches for one model call.

        ``lora_cond``/``lora_uncond`` are ``[len(active), B, C, H, W]`` in ``active`` order,
        denoised estimates when ``x`` is given, noise-like otherwise (see
        :func:`loratorio.fusion.compose`). ``lora_uncond`` is needed only when
        :attr:`needs_uncond` and ``base_uncond`` is given; ``merged_cond`` (and with it
        ``merged_uncond``) only when :meth:`needs_merged`. The returned weights cover all
        branches, ``[N, B, 1, H, W]``, zero for branches not evaluated or dropped.
        """
        if len(active) != lora_cond.shape[0]:
            raise ValueError(f"active names {len(active)} branches but lora_cond holds {lora_cond.shape[0]}")
        use_uncond = base_uncond is not None and self.needs_uncond
        if use_uncond and lora_uncond is None:
            raise ValueError("lora_uncond is required when re-centring is on and base_uncond is given")
        use_merged = self.needs_merged(active)
        if not use_merged:
            merged_cond = merged_uncond = None
        if use_merged and (merged_cond is None or (use_uncond and merged_uncond is None)):
            raise ValueError(f"method {self.method!r} needs the merged row's predictions for {len(active)} branches")
        self.calls += 1
        self.branch_evaluations += len(active)
        batch, _, height, width = base_cond.shape
        full = torch.zeros(len(self.names), batch, 1, height, width, device=base_cond.device)
        merged = [merged_cond, merged_uncond if use_uncond else None] if use_merged else []
        base_ok, keep, merged_ok = self._finite(base_cond, base_uncond, lora_cond, lora_uncond if use_uncond else None,
                                                merged)
        if not base_ok:
            # The model diverged on its own (too high a CFG scale, a broken checkpoint):
            # the branches are not to blame, and there is nothing sound to compose against.
            self.base_nonfinite += 1
            return Composition(cond=base_cond, uncond=base_uncond, weights=full)
        for i in set(range(len(active))) - set(keep):
            self.dropped[self.names[active[i]]] += 1
        if not keep:
            # Nothing usable this step: the base prediction is the safe answer.
            return Composition(cond=base_cond, uncond=base_uncond, weights=full)
        if len(keep) < len(active):
            index = _on_device(keep, lora_cond.device)
            lora_cond = lora_cond.index_select(0, index)
            lora_uncond = lora_uncond.index_select(0, index) if use_uncond else None
        top_k = self.top_k if 0 < self.top_k < len(keep) else 0
        options = dict(self.fusion_options)
        if use_merged and merged_ok and len(keep) == len(active):
            options.update(merged_cond=merged_cond, merged_uncond=merged_uncond if use_uncond else None)
        else:
            # without every branch in it (one dropped, or the merged row itself not finite) the merged
            # prediction is not the one of the branches composed here
            options["joint"] = 0.0
        res = compose(
            base_cond, lora_cond,
            base_uncond, lora_uncond if use_uncond else None,
            step=step, x=x, patch_size=self.patch_size, temperature_scale=self.temperature_scale,
            recenter=self.recenter if base_uncond is not None else 0.0, top_k=top_k, **options,
        )
        kept = [active[i] for i in keep]
        if kept == list(range(len(self.names))):
            full = res.weights.to(full.device, torch.float32).contiguous()
        else:
            full.index_copy_(0, _on_device(kept, full.device), res.weights.to(full.device, full.dtype))
        self.policy.observe(step, kept, res.weights)
        if self.record_map:
            self._record(full)
        return Composition(cond=res.cond, uncond=res.uncond, weights=full)

    @staticmethod
    def _finite(base_cond: torch.Tensor, base_uncond: torch.Tensor | None, lora_cond: torch.Tensor,
                lora_uncond: torch.Tensor | None, merged: list) -> tuple[bool, list[int], bool]:
        """``(base finite, indices of the finite branches, merged row finite)`` with one read from the device.

        The checks run where the predictions are; their verdicts come to the host in a
        single read per call (which branches to compose is a decision that needs it), not
        one read per tensor, which would stall the device queue once per branch.
        """
        flags = torch.isfinite(lora_cond).flatten(1).all(1)
        if lora_uncond is not None:
            flags = flags & torch.isfinite(lora_uncond).flatten(1).all(1)
        base = torch.isfinite(base_cond).all()
        if base_uncond is not None:
            base = base & torch.isfinite(base_uncond).all()
        merged_ok = base.new_ones(())
        for tensor in merged:
            if tensor is not None:
                merged_ok = merged_ok & torch.isfinite(tensor).all()
        verdicts = host_flags(torch.cat([base.reshape(1), merged_ok.reshape(1), flags]))
        return verdicts[0], [i for i, ok in enumerate(verdicts[2:]) if ok], verdicts[1]

    def _record(self, weights: torch.Tensor) -> None:
        # Summed where the weights are (no copy to the host per step); read once per generation.
        maps = weights[:, :, 0].float()
        if self._map_sum is not None and self._map_sum.device != maps.device:
            self._map_sum = self._map_sum.to(maps.device)
        if self._map_sum is not None and self._map_sum.shape != maps.shape:
            if self._map_sum.shape[:2] == maps.shape[:2]:
                # A hires pass: carry the earlier steps over at the new resolution.
                self._map_sum = F.interpolate(self._map_sum, size=maps.shape[-2:], mode="nearest")
            else:
                self._map_sum, self._map_steps = None, 0
        self._map_sum = maps if self._map_sum is None else self._map_sum + maps
        self._map_steps += 1

    def mean_weights(self) -> torch.Tensor | None:
        """Weights averaged over the recorded calls, ``[N, B, H, W]`` on the CPU (None before any)."""
        if self._map_sum is None:
            return None
        return (self._map_sum / self._map_steps).cpu()
