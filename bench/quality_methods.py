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
  ``options`` passes the core's steps beyond the paper (``descriptor``, ``centred``,
  ``mix``, ``conflict``; see :mod:`loratorio.fusion`) to ``compose``: variants tried one at a time.
- ``engine``: a named method (``Method.method``, a ``Settings.method`` value) through
  ``loratorio.engine.Composer.from_settings`` (one composer per composition): exactly
  what a user with those settings gets, including dynamic selection (with
  ``probe_every > 1`` and a ``top_k`` only the kept LoRAs are evaluated between probe
  steps, so the cost per step drops).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from bench.quality_model import ddim_step, ddim_timesteps
from bench.quality_report import PAPER, PAPER_LAMBDA1, default_name
from loratorio.engine import Composer
from loratorio.fusion import compose, method_options
from loratorio.routing import Router
from loratorio.settings import Settings


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
    options: tuple = ()  # compose() options beyond the paper, as sorted (name, value) pairs
    method: str = "paper"  # for kind "engine": the Settings.method the composer is built from

    def evals_per_step(self, n: int) -> int:
        """Denoiser evaluations (images through the model) per sampling step for N LoRAs (the most, for ``engine``)."""
        if self.kind in ("base", "merge", "switch"):
            return 2
        if self.kind == "composite":
            return 2 * n
        merged = 2 if n > 1 and self.fusion_options().get("joint", 0) > 0 else 0  # the merged row, cond and uncond
        return (2 * n + 2 if self.recenter > 0 else n + 2) + merged

    def fusion_options(self) -> dict:
        """The ``compose`` options this method runs with."""
        return method_options(self.method) if self.kind == "engine" else dict(self.options)

    def settings(self) -> str:
        if self.kind == "switch":
            return f"every {self.switch_every} step(s)"
        if self.kind not in ("loratorio", "engine"):
            return ""
        text = (f"lambda={self.recenter:g}, c={self.temperature_scale:g}, p={self.patch_size}, "
                f"top_k={self.top_k or 'all'}")
        if self.schedule != "ours":
            text += f", schedule={self.schedule}"
        text += "".join(f", {k}={v}" for k, v in self.options)
        if self.kind == "engine":
            text = f"method={self.method}, " + text + (f", probe every {self.probe_every}" if self.probe_every > 1
                                                       else "")
        return text

    def composer(self, names: list[str]) -> Composer:
        """The composer a user with this method's settings gets (kind ``engine``)."""
        settings = Settings(enabled=True, recenter=self.recenter, temperature_scale=self.temperature_scale,
                            patch_size=self.patch_size, top_k=self.top_k, probe_every=self.probe_every,
                            method=self.method).validate()
        return Composer.from_settings(names, settings, record_map=True)


def default_methods() -> list[Method]:
    """The compared methods: baselines, the paper's step and the shipped default as a user gets them
    (``Composer.from_settings``), and the default with one option changed at a time."""
    d = Settings()
    user = dict(recenter=d.recenter, temperature_scale=d.temperature_scale, patch_size=d.patch_size)
    options = method_options(d.method)

    def ablation(label: str, recenter: float | None = None, patch_size: int | None = None, **changes) -> Method:
        opts = {**options, **changes}
        settings = {**user, "recenter": d.recenter if recenter is None else recenter,
                    "patch_size": d.patch_size if patch_size is None else patch_size}
        return Method(f"default, {label}", "loratorio", **settings, options=tuple(sorted(opts.items())))

    return [
        Method("base (no LoRA)", "base"),
        Method("merge", "merge"),
        Method("switch k=1", "switch", switch_every=1),
        Method(PAPER, "engine", method="paper", recenter=0.5),
        Method(PAPER_LAMBDA1, "engine", method="paper", recenter=1.0),
        Method(default_name(d.method), "engine", method=d.method, **user),
        Method("loratorio resolve", "engine", method="resolve", **user),
        ablation("the whole merged-row term (joint=1)", joint=1.0),
        ablation("lambda 0.5", recenter=0.5),
        ablation("no conflict resolution (mix=sum)", mix="sum"),
        ablation("ownership gates (mix=delta)", mix="delta"),
        ablation("conflicts tested per patch (conflict=patch)", conflict="patch"),
        ablation("patch size 1", patch_size=1),
    ]


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
    joint = method.kind in ("loratorio", "engine") and method.fusion_options().get("joint", 0) > 0 and n > 1
    if method.kind == "loratorio":
        layout = _BranchLayout(branches, len(loras), with_base=True, with_uncond=method.recenter > 0)
    elif method.kind == "composite":
        layout = _BranchLayout(branches, len(loras), with_base=False, with_uncond=True)
    elif method.kind == "engine":
        composers = [method.composer([str(j) for j in br]) for br in branches]
        evals = torch.zeros(bsz)
    if method.kind == "merge" or joint:
        # all of a composition's LoRAs at once: the merge baseline, and the merged row of method "joint"
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
            needs = [c.needs_merged(a) for c, a in zip(composers, active)]
            mout = None
            if any(needs):
                mout = _call(model, t, x.repeat_interleave(2, 0), merge_tokens, merge_router, merge_rows)
            cond, uncond = torch.empty_like(x), torch.empty_like(x)
            for b, composer in enumerate(composers):
                merged_preds = {}
                if needs[b]:
                    merged_preds = {"merged_cond": mout[2 * b:2 * b + 1], "merged_uncond": mout[2 * b + 1:2 * b + 2]}
                res = composer.fuse(
                    step=k, active=active[b], base_cond=out[b:b + 1], base_uncond=out[bsz + b:bsz + b + 1],
                    lora_cond=out[lay.cond_rows[b]].unsqueeze(1),
                    lora_uncond=out[lay.uncond_rows[b]].unsqueeze(1) if method.recenter > 0 else None,
                    **merged_preds,
                )
                cond[b], uncond[b] = res.cond[0], res.uncond[0]
                evals[b] += 2 + len(active[b]) * (2 if method.recenter > 0 else 1) + 2 * needs[b]
        else:
            out = _call(model, t, *layout.inputs(x, tokens), router, layout.rows)
            step = k if method.schedule == "ours" else len(ts) - 1 - k
            merged_preds = {}
            if joint:
                mout = _call(model, t, x.repeat_interleave(2, 0), merge_tokens, merge_router, merge_rows)
                merged_preds = {"merged_cond": mout[0::2], "merged_uncond": mout[1::2]}
            res = compose(
                out[:bsz], out[layout.cond_idx],
                out[bsz:2 * bsz], out[layout.uncond_idx] if method.recenter > 0 else None,
                step=step, patch_size=method.patch_size, temperature_scale=method.temperature_scale,
                recenter=method.recenter, top_k=method.top_k, **dict(method.options), **merged_preds,
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
