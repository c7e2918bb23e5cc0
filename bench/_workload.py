"""The denoising-step variants the benchmark compares, on one model and one batch.

Every variant computes the same LoRAtorio step for a batch of ``B`` images with ``N``
LoRAs and differs only in how the UNet evaluations are arranged:

- ``step``: what the extension does. One routed call evaluates the base model's cond +
  uncond rows (``2B``, unrouted) and every LoRA branch (``2NB`` rows, branch ``j``'s cond
  and uncond rows routed to LoRA ``j``): the branch rows ride in the host's own model
  call; then ``compose`` (method steps 1-8).
- ``step_two_calls``: the same with the base rows in a call of their own (the host's) and
  the branch rows in a second, routed call: what the extension does where a host feature
  keeps the branches apart (see the README's compatibility notes).
- ``floor``: one plain call of the same total rows with no adapters (no routing, no
  fusion): the cost of ``2N + 2`` evaluations, below which the exact method cannot go.
- ``remerge``: what a WebUI merge path would have to do: for the base and for each
  branch, restore the weights from a backup, merge that one LoRA into them, and run that
  branch's cond/uncond rows (``N + 1`` calls of ``2B`` rows, ``N`` merges), then compose.

Predictions are treated as noise predictions of the UNet; ``compose`` gets ``x`` and so
runs its denoised-form path (one extra subtraction per tensor): the costlier of the two.
"""

from __future__ import annotations

import torch

from loratorio.fusion import Composition, compose, method_options
from loratorio.lora import delta_weight, pieces, total_nbytes
from loratorio.routing import Router
from loratorio.selection import ProbePolicy

from ._model import Model

LATENT_CHANNELS = 4


class Workload:
    """One model, a pool of adapter sets, and fixed inputs for batch ``batch`` at ``latent x latent``."""

    def __init__(self, model: Model, adapters: list[dict], *, batch: int, latent: int, seed: int = 0):
        self.model, self.adapters, self.batch, self.latent = model, adapters, batch, latent
        self.router = Router(model.targets, adapters)
        self._backup = model.weight_backup()
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(batch, LATENT_CHANNELS, latent, latent, generator=gen).to(model.device, model.dtype)
        self._cond = model.context(batch, seed + 1)
        self._uncond = model.context(batch, seed + 2)
        self._inputs: dict[tuple[int, bool], tuple] = {}
        self._merge_on_device = self._delta_weight_works()

    # -- inputs -----------------------------------------------------------------------------
    def inputs(self, blocks: int, with_uncond: bool = True) -> tuple:
        """``(x, context, extra)`` for ``blocks`` row blocks, each cond rows then (optionally) uncond rows.

        Built once and cached: every variant gets its batch ready-made, so none is timed
        building it.
        """
        key = (blocks, with_uncond)
        if key not in self._inputs:
            per = [self._cond, self._uncond] if with_uncond else [self._cond]
            x = self.x.repeat(blocks * len(per), 1, 1, 1)
            ctx = torch.cat(per * blocks)
            self._inputs[key] = (x, ctx, self.model.extra(x.shape[0]))
        return self._inputs[key]

    @property
    def factor_nbytes(self) -> int:
        """Bytes of the adapters' factors as loaded."""
        return sum(total_nbytes(a) for a in self.adapters)

    # -- calls --------------------------------------------------------------------------------
    def base(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The host's plain call: base cond and uncond predictions, ``[B, 4, H, W]`` each (noise form)."""
        out = self.model(*self.inputs(1, True))
        return out[: self.batch], out[self.batch:]

    def plain(self, blocks: int, with_uncond: bool = True) -> torch.Tensor:
        """One plain call over ``blocks`` row blocks, no adapters."""
        return self.model(*self.inputs(blocks, with_uncond))

    def branch_rows(self, active: list[int], with_uncond: bool) -> list[slice | None]:
        """Router rows: adapter ``active[i]`` owns row block ``i``."""
        per = (2 if with_uncond else 1) * self.batch
        rows: list[slice | None] = [None] * len(self.adapters)
        for pos, j in enumerate(active):
            rows[j] = slice(pos * per, (pos + 1) * per)
        return rows

    def branches(self, active: list[int], with_uncond: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One routed call for the LoRA branches ``active``: cond ``[n, B, 4, H, W]`` and uncond (or None)."""
        x, ctx, extra = self.inputs(len(active), with_uncond)
        with self.router.route(self.branch_rows(active, with_uncond)):
            out = self.model(x, ctx, extra)
        out = out.reshape(len(active), 2 if with_uncond else 1, self.batch, *out.shape[1:])
        return out[:, 0], (out[:, 1] if with_uncond else None)

    def step(self, active: list[int], *, recenter: float = 0.5, step: int = 5, top_k: int = 0,
             method: str = "paper") -> Composition:
        """One full LoRAtorio step as the extension runs it: one routed call of every row, then compose
        with the named ``method``'s options.

        The call holds the base cond + uncond rows (unrouted) and each active branch's cond
        rows (and uncond rows when ``recenter > 0``) routed to its LoRA: ``(2n+2)B`` rows,
        ``(n+2)B`` at ``recenter = 0``. A method with the merged row (``joint``) adds one
        more block, routed to every active LoRA at once: ``(2n+4)B`` rows.
        """
        with_uncond = recenter > 0
        options = method_options(method)
        merged = options.get("joint", 0) > 0 and len(active) > 1
        x, ctx, extra = self.one_call_inputs(len(active) + merged, with_uncond)
        per = (2 if with_uncond else 1) * self.batch
        base = 2 * self.batch
        rows: list = [None] * len(self.adapters)
        shared = slice(base + len(active) * per, base + (len(active) + 1) * per)
        for pos, j in enumerate(active):
            rows[j] = slice(base + pos * per, base + (pos + 1) * per)
            if merged:
                rows[j] = [rows[j], shared]
        with self.router.route(rows):
            out = self.model(x, ctx, extra)
        base_cond, base_uncond = out[: self.batch], out[self.batch:base]
        branch = out[base:].reshape(len(active) + merged, 2 if with_uncond else 1, self.batch, *out.shape[1:])
        if merged:
            options.update(merged_cond=branch[-1, 0], merged_uncond=branch[-1, 1] if with_uncond else None)
            branch = branch[:-1]
        return compose(base_cond, branch[:, 0], base_uncond, branch[:, 1] if with_uncond else None, step=step,
                       x=self.x, recenter=recenter, top_k=top_k, **options)

    def step_two_calls(self, active: list[int], *, recenter: float = 0.5, step: int = 5, top_k: int = 0
                       ) -> Composition:
        """The step with the base rows in the host's own call and the branch rows in a second, routed call."""
        base_cond, base_uncond = self.base()
        lora_cond, lora_uncond = self.branches(active, with_uncond=recenter > 0)
        return compose(base_cond, lora_cond, base_uncond, lora_uncond, step=step, x=self.x,
                       recenter=recenter, top_k=top_k)

    def one_call_inputs(self, n: int, with_uncond: bool) -> tuple:
        """Inputs of the one-call step: the base cond + uncond rows, then ``n`` branch blocks."""
        if with_uncond:
            return self.inputs(n + 1, True)
        return self._floor_inputs_no_uncond(n)

    def floor(self, n: int, with_uncond: bool = True) -> torch.Tensor:
        """The floor of a step with ``n`` branches: one plain call of all its rows."""
        if with_uncond:
            return self.plain(n + 1, True)
        return self._floor_no_uncond(n)

    def _floor_no_uncond(self, n: int) -> torch.Tensor:
        return self.model(*self._floor_inputs_no_uncond(n))

    def _floor_inputs_no_uncond(self, n: int) -> tuple:
        # base cond + uncond and n cond-only branches: n + 2 row blocks of B rows.
        key = ("floor0", n)
        if key not in self._inputs:
            x, ctx, _ = self.inputs(1, True)
            bx, bctx, _ = self.inputs(n, False)
            rows = x.shape[0] + bx.shape[0]
            self._inputs[key] = (torch.cat([x, bx]), torch.cat([ctx, bctx]), self.model.extra(rows))
        return self._inputs[key]

    # -- the WebUI merge path ------------------------------------------------------------------
    def restore(self) -> None:
        """Copy every target weight back from the backup (as WebUI does before a new merge)."""
        for name, module in self.model.targets.items():
            module.weight.copy_(self._backup[name])

    def merge(self, j: int) -> None:
        """Merge adapter set ``j`` into the target weights in place: ``W += delta``."""
        for name, entry in self.adapters[j].items():
            weight = self.model.targets[name].weight
            weight.add_(self._delta(entry, weight))

    def _delta(self, entry, weight: torch.Tensor) -> torch.Tensor:
        if self._merge_on_device:
            return delta_weight(entry, weight.shape).to(weight.dtype)
        # delta_weight builds its sum on the CPU; on an accelerator the merge path computes
        # each factor product where the weight lives, as WebUI's merge does.
        return sum(p.delta() for p in pieces(entry)).reshape(weight.shape).to(weight.dtype)

    def _delta_weight_works(self) -> bool:
        name, module = next(iter(self.model.targets.items()))
        try:
            delta = delta_weight(self.adapters[0][name], module.weight.shape)
        except RuntimeError:
            return False
        return delta.device == module.weight.device

    def remerge_step(self, active: list[int], *, recenter: float = 0.5, step: int = 5) -> Composition:
        """The step done by restore + merge + call per branch (``N + 1`` calls, ``N`` merges)."""
        with_uncond = recenter > 0
        self.restore()
        base_cond, base_uncond = self.base()
        x, ctx, extra = self.inputs(1, with_uncond)
        conds, unconds = [], []
        for j in active:
            self.restore()
            self.merge(j)
            out = self.model(x, ctx, extra)
            conds.append(out[: self.batch])
            if with_uncond:
                unconds.append(out[self.batch:])
        self.restore()
        return compose(base_cond, torch.stack(conds), base_uncond, torch.stack(unconds) if with_uncond else None,
                       step=step, x=self.x, recenter=recenter)

    def merged_rows(self, j: int) -> torch.Tensor:
        """Reference: branch ``j``'s cond + uncond rows from the model with only LoRA ``j`` merged."""
        self.restore()
        self.merge(j)
        try:
            return self.model(*self.inputs(1, True))
        finally:
            self.restore()

    # -- selection across steps ------------------------------------------------------------------
    def sampling_pass(self, policy: ProbePolicy, steps: int, *, top_k: int) -> list[int]:
        """Run ``steps`` LoRAtorio steps with ``policy`` choosing the branches; returns branches run per step."""
        policy.reset()
        counts = []
        for k in range(steps):
            active = policy.active(k)
            result = self.step(active, step=k, top_k=top_k)
            policy.observe(k, active, result.weights)
            counts.append(len(active))
        return counts
