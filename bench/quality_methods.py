"""Multi-LoRA composition methods, sampled on the same seeds with the same DDIM sampler.

All predictions are v (noise-like form, no ``x`` passed to ``compose``); guidance is
``uncond + w * (cond - uncond)`` on whatever pair a method produces. LoRA branches run
as rows of one batched model call through :class:`loratorio.routing.Router`.

- ``base``: no LoRA at all (the "naive" row of ComposLoRA tables).
- ``merge``: all N LoRAs applied at once (their deltas summed), one branch.
- ``switch``: one LoRA active at a time, the next one every ``switch_every`` steps.
- ``composite``: uniform mean of the N LoRAs' cond and of their uncond predictions;
  the base model is never evaluated.
- ``loratorio``: :func:`loratorio.fusion.compose` on the base and N LoRA branches with
  the method's settings. ``schedule = "ours"`` passes the 0-based step ``k`` (temperature
  ``1 / (c k)``: uniform at the first step, sharpening as sampling proceeds);
  ``"reverse"`` passes ``T - 1 - k`` (sharp first, uniform at the last step), the other
  reading of the paper's ``tau = 1 / ((T - t) c)``.
- ``descriptor = "channels"`` (a bench-only candidate, not the method as specified):
  the patch vectors keep the colour channels instead of averaging them (step 1), the
  rest of the step is the core's ``softmin_weights`` and the same mixing.
- ``descriptor = "centred"`` (bench-only candidate): the core's patch similarity, minus
  each LoRA's mean similarity over the image's patches, before the SoftMin. A LoRA that
  differs from the base everywhere (a global style) then no longer wins every patch;
  each LoRA wins where it differs more than it usually does.
- ``engine``: the same step through :class:`loratorio.engine.Composer` (one per
  composition), which adds dynamic selection: with ``probe_every > 1`` and a ``top_k``,
  only the kept LoRAs are evaluated between probe steps, so the cost per step drops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.quality_model import ddim_step, ddim_timesteps
from loratorio.engine import Composer
from loratorio.fusion import compose, patch_similarity, softmin_weights
from loratorio.routing import Router


@dataclass(frozen=True)
class Method:
    name: str
    kind: str  # base | merge | switch | composite | loratorio | engine
    switch_every: int = 1
    recenter: float = 0.5
    temperature_scale: float = 10.0
    patch_size: int = 2
    top_k: int = 0
    schedule: str = "ours"
    probe_every: int = 1
    descriptor: str = "mean"  # "channels" | "centred": bench-only candidates

    def evals_per_step(self, n: int) -> int:
        """Denoiser evaluations (images through the model) per sampling step for N LoRAs (the most, for ``engine``)."""
        if self.kind in ("base", "merge", "switch"):
            return 2
        if self.kind == "composite":
            return 2 * n
        return 2 * n + 2 if self.recenter > 0 else n + 2

    def settings(self) -> str:
        if self.kind == "switch":
            return f"every {self.switch_every} step(s)"
        if self.kind not in ("loratorio", "engine"):
            return ""
        text = (f"lambda={self.recenter:g}, c={self.temperature_scale:g}, p={self.patch_size}, "
                f"top_k={self.top_k or 'all'}, schedule={self.schedule}")
        if self.descriptor != "mean":
            text += f", descriptor={self.descriptor}"
        return text + (f", probe every {self.probe_every}" if self.kind == "engine" else "")


def default_methods() -> list[Method]:
    """The compared methods: three baselines and LoRAtorio's settings varied one at a time from the default."""
    lt = "loratorio"
    return [
        Method("base (no LoRA)", "base"),
        Method("merge", "merge"),
        Method("switch k=1", "switch", switch_every=1),
        Method("switch k=5", "switch", switch_every=5),
        Method("composite", "composite"),
        Method("loratorio (default)", lt),
        Method("loratorio lambda=0", lt, recenter=0.0),
        Method("loratorio top_k=1", lt, top_k=1),
        Method("loratorio top_k=2", lt, top_k=2),
        Method("loratorio c=1", lt, temperature_scale=1.0),
        Method("loratorio c=100", lt, temperature_scale=100.0),
        Method("loratorio reverse schedule", lt, schedule="reverse"),
        Method("loratorio p=1", lt, patch_size=1),
        Method("loratorio p=4", lt, patch_size=4),
        Method("loratorio top_k=2 probe 4", "engine", top_k=2, probe_every=4),
        Method("candidate: channel descriptor", lt, descriptor="channels"),
        Method("candidate: centred similarity", lt, descriptor="centred"),
    ]


def _channel_similarity(base: torch.Tensor, lora: torch.Tensor, patch: int) -> torch.Tensor:
    """Cosine per patch with the channels kept: ``[B,C,H,W]``, ``[N,B,C,H,W]`` -> ``[N,B,H/p,W/p]``."""
    def vec(t):
        *lead, c, h, w = t.shape
        n = len(lead)
        t = t.float().reshape(*lead, c, h // patch, patch, w // patch, patch)
        t = t.permute(*range(n), n + 1, n + 3, n, n + 2, n + 4)  # [..., H/p, W/p, C, p, p]
        return t.reshape(*lead, h // patch, w // patch, c * patch * patch)

    bv, lv = vec(base), vec(lora)
    dot = (bv * lv).sum(-1)
    return dot / (bv.norm(dim=-1).clamp_min(1e-8) * lv.norm(dim=-1).clamp_min(1e-8))


def _candidate_compose(base_cond, lora_cond, base_uncond, lora_uncond, *, step, method):
    """The LoRAtorio step with a candidate descriptor; returns (cond, uncond, weights [N,B,1,H,W])."""
    if method.descriptor == "channels":
        sim = _channel_similarity(base_cond, lora_cond, method.patch_size)
    else:
        sim = patch_similarity(base_cond, lora_cond, patch_size=method.patch_size)
        sim = sim - sim.mean(dim=(-2, -1), keepdim=True)
    w = softmin_weights(sim, step=step, temperature_scale=method.temperature_scale, top_k=method.top_k)
    p = method.patch_size
    w = w.repeat_interleave(p, -2).repeat_interleave(p, -1).unsqueeze(2)
    cond = (w * lora_cond).sum(0)
    uncond = base_uncond
    if method.recenter > 0:
        uncond = method.recenter * (w * lora_uncond).sum(0) + (1 - method.recenter) * base_uncond
    return cond, uncond, w


def _call(model, t, x, tokens, router=None, rows=None):
    tt = torch.full((x.shape[0],), t, dtype=torch.long)
    if router is None:
        return model(x, tt, tokens)
    with router.route(rows):
        return model(x, tt, tokens)


class _BranchLayout:
    """Row layout of one call running base rows and per-LoRA rows for a batch of compositions.

    ``branches[b]`` lists the LoRA indices run for composition ``b`` (all of equal
    length N); rows of LoRA ``j`` are contiguous (cond rows, then uncond rows) so one
    slice per LoRA routes them.
    """

    def __init__(self, branches, n_loras: int, with_base: bool, with_uncond: bool):
        bsz = len(branches)
        comp_of, is_uncond = [], []
        if with_base:
            comp_of += list(range(bsz)) * 2
            is_uncond += [False] * bsz + [True] * bsz
        self.rows: list[slice | None] = [None] * n_loras
        # per composition, the rows of its branches in branch order (lists may differ in length)
        self.cond_rows = [[0] * len(br) for br in branches]
        self.uncond_rows = [[0] * len(br) for br in branches]
        for j in range(n_loras):
            members = [(b, pos) for b, br in enumerate(branches) for pos, jj in enumerate(br) if jj == j]
            if not members:
                continue
            start = len(comp_of)
            for kind in ([False, True] if with_uncond else [False]):
                for b, pos in members:
                    (self.uncond_rows if kind else self.cond_rows)[b][pos] = len(comp_of)
                    comp_of.append(b)
                    is_uncond.append(kind)
            self.rows[j] = slice(start, len(comp_of))
        if len({len(br) for br in branches}) == 1:
            self.cond_idx = torch.tensor(self.cond_rows).T  # [N, B]
            self.uncond_idx = torch.tensor(self.uncond_rows).T
        self.comp_of = torch.tensor(comp_of)
        self.is_uncond = torch.tensor(is_uncond)
        self.bsz = bsz

    def inputs(self, x, tokens):
        toks = torch.where(self.is_uncond[:, None], torch.zeros_like(tokens[self.comp_of]), tokens[self.comp_of])
        return x[self.comp_of], toks


@torch.no_grad()
def sample(method: Method, model, targets, loras, branches, tokens, noise, steps: int, cfg: float):
    """Generate one image per composition.

    ``loras``: adapter sets of all LoRAs; ``branches[b]``: indices of composition b's
    LoRAs (equal length N); ``tokens [B, L]``; ``noise [B, 3, H, W]`` (the seed).
    Returns images ``[B, 3, H, W]`` in [0, 1], for LoRAtorio the mean composition
    weights over steps ``[N, B, H, W]`` (else None), and the denoiser evaluations per
    step of each composition ``[B]``.
    """
    router = Router(targets, loras)
    bsz, n = len(branches), len(branches[0])
    ts = ddim_timesteps(steps)
    x = noise.clone()
    null = torch.zeros_like(tokens)
    weight_sum = None
    layout = None
    if method.kind == "loratorio":
        layout = _BranchLayout(branches, len(loras), with_base=True, with_uncond=method.recenter > 0)
    elif method.kind == "composite":
        layout = _BranchLayout(branches, len(loras), with_base=False, with_uncond=True)
    elif method.kind == "engine":
        composers = [Composer([str(j) for j in br], recenter=method.recenter,
                              temperature_scale=method.temperature_scale, patch_size=method.patch_size,
                              top_k=method.top_k, probe_every=method.probe_every, record_map=True)
                     for br in branches]
        evals = torch.zeros(bsz)
    elif method.kind == "merge":
        merged = [{name: [a[name] for a in (loras[j] for j in br) if name in a] for name in targets} for br in branches]
        merge_router = Router(targets, [{k: v for k, v in m.items() if v} for m in merged])
        merge_rows = [slice(2 * b, 2 * b + 2) for b in range(bsz)]
        merge_tokens = torch.stack([tokens, null], 1).reshape(2 * bsz, -1)
    for k, t in enumerate(ts):
        if method.kind == "base":
            out = _call(model, t, torch.cat([x, x]), torch.cat([tokens, null]))
            cond, uncond = out[:bsz], out[bsz:]
        elif method.kind == "merge":
            out = _call(model, t, x.repeat_interleave(2, 0), merge_tokens, merge_router, merge_rows)
            cond, uncond = out[0::2], out[1::2]
        elif method.kind == "switch":
            active = [[br[(k // method.switch_every) % n]] for br in branches]
            lay = _BranchLayout(active, len(loras), with_base=False, with_uncond=True)
            out = _call(model, t, *lay.inputs(x, tokens), router, lay.rows)
            ar = torch.arange(bsz)
            cond, uncond = out[lay.cond_idx[0, ar]], out[lay.uncond_idx[0, ar]]
        elif method.kind == "composite":
            out = _call(model, t, *layout.inputs(x, tokens), router, layout.rows)
            cond, uncond = out[layout.cond_idx].mean(0), out[layout.uncond_idx].mean(0)
        elif method.kind == "engine":
            active = [c.active(k) for c in composers]
            lay = _BranchLayout([[br[i] for i in act] for br, act in zip(branches, active)], len(loras),
                                with_base=True, with_uncond=method.recenter > 0)
            out = _call(model, t, *lay.inputs(x, tokens), router, lay.rows)
            cond, uncond = torch.empty_like(x), torch.empty_like(x)
            for b, composer in enumerate(composers):
                res = composer.fuse(
                    step=k, active=active[b], base_cond=out[b:b + 1], base_uncond=out[bsz + b:bsz + b + 1],
                    lora_cond=out[lay.cond_rows[b]].unsqueeze(1),
                    lora_uncond=out[lay.uncond_rows[b]].unsqueeze(1) if method.recenter > 0 else None,
                )
                cond[b], uncond[b] = res.cond[0], res.uncond[0]
                evals[b] += 2 + len(active[b]) * (2 if method.recenter > 0 else 1)
        else:
            out = _call(model, t, *layout.inputs(x, tokens), router, layout.rows)
            step = k if method.schedule == "ours" else len(ts) - 1 - k
            if method.descriptor != "mean":
                cond, uncond, w = _candidate_compose(
                    out[:bsz], out[layout.cond_idx], out[bsz:2 * bsz],
                    out[layout.uncond_idx] if method.recenter > 0 else None, step=step, method=method)
                weight_sum = w[:, :, 0] if weight_sum is None else weight_sum + w[:, :, 0]
                x = ddim_step(x, uncond + cfg * (cond - uncond), t, ts[k + 1] if k + 1 < len(ts) else None)
                continue
            res = compose(
                out[:bsz], out[layout.cond_idx],
                out[bsz:2 * bsz], out[layout.uncond_idx] if method.recenter > 0 else None,
                step=step, patch_size=method.patch_size, temperature_scale=method.temperature_scale,
                recenter=method.recenter, top_k=method.top_k,
            )
            cond, uncond = res.cond, res.uncond
            w = res.weights[:, :, 0]
            weight_sum = w if weight_sum is None else weight_sum + w
        v = uncond + cfg * (cond - uncond)
        x = ddim_step(x, v, t, ts[k + 1] if k + 1 < len(ts) else None)
    maps = weight_sum / len(ts) if weight_sum is not None else None
    if method.kind == "engine":
        maps = torch.cat([c.mean_weights() for c in composers], dim=1)
        evals = evals / len(ts)
    else:
        evals = torch.full((bsz,), float(method.evals_per_step(n)))
    return ((x + 1) / 2).clamp(0, 1), maps, evals
