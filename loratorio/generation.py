"""The state of one generation and the row layout of its model calls (host-free).

:class:`GenerationState` lives on the WebUI's processing object for one generation:
the settings, the branches loaded for the current batch, what was skipped and why, the
composer of the current batch of images, the composition maps and the notes that end up
in the infotext and under the images. :func:`plan_calls` / :func:`call_rows` lay out the
branch rows of one step's model call(s).

Flow of one generation (host code in brackets)::

    state = start_generation(p, args, ...)                 # host_lifecycle: settings, state on p
    state.load(first_prompt_of_batch, bridge, cache)       # branches; skip reasons collected
    [keep the built-in LoRA off state.handled_names]
    state.new_composer()                                   # per batch of images
    [per-branch text conds; per step: state.composer.active(step), plan_calls/call_rows,
     one routed model call, state.composer.fuse(...), in-place write-back]
    state.record_map(); state.count_dropped()
    p.extra_generation_params.update(state.infotext())
    state.close()                                          # in a finally block
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .loading import AdapterCache, Branch, BranchPlan, HostBridge, Reason, load_branches, plan_branches
from .lora import check_fit
from .settings import INFOTEXT_KEYS, Settings, join_names
from .tags import LoraTag, parse_lora_tags

__all__ = ["STATE_ATTR", "GenerationState", "call_rows", "get_state", "plan_calls", "tags_of", "usable"]

STATE_ATTR = "loratorio_state"


# -- rows of the model calls ------------------------------------------------------------------


def plan_calls(counts: Sequence[int], max_rows: int = 0) -> list[list[tuple[int, int, int]]]:
    """Split the rows of consecutive branches into model calls of at most ``max_rows`` rows.

    ``counts[j]`` is the number of rows branch ``j`` needs this step. Returns one list
    per call of ``(j, start, stop)``: rows ``start:stop`` of branch ``j``, in order and
    contiguous within the call, so routing gives every branch one slice per call.
    ``max_rows = 0``: one call for everything. Branches with no rows are left out.
    """
    if max_rows < 0:
        raise ValueError(f"max_rows must be >= 0, got {max_rows}")
    calls: list[list[tuple[int, int, int]]] = []
    current: list[tuple[int, int, int]] = []
    room = max_rows or math.inf
    for j, n in enumerate(counts):
        start = 0
        while start < n:
            take = int(min(n - start, room))
            current.append((j, start, start + take))
            start += take
            room -= take
            if room == 0:
                calls.append(current)
                current, room = [], max_rows
    if current:
        calls.append(current)
    return calls


def call_rows(call: Sequence[tuple[int, int, int]], n_adapters: int,
              owner: Sequence[int] | None = None) -> list[slice | None]:
    """Routing rows of one call from :func:`plan_calls`: ``rows[a]`` = adapter ``a``'s slice or None.

    ``owner[j]`` is the adapter of block ``j`` (default: block ``j`` is adapter ``j``);
    adjacent blocks of one adapter (its cond and uncond rows) share one slice.
    """
    rows: list[slice | None] = [None] * n_adapters
    offset = 0
    last = None
    for j, start, stop in call:
        a = j if owner is None else owner[j]
        n = stop - start
        if rows[a] is not None:
            if last != a:
                raise ValueError(f"rows of adapter {a} are not contiguous in this call")
            rows[a] = slice(rows[a].start, offset + n)
        else:
            rows[a] = slice(offset, offset + n)
        offset += n
        last = a
    return rows


# -- per-generation state --------------------------------------------------------------------


class GenerationState:
    """Everything LoRAtorio holds for one generation; lives on the processing object.

    Never stored in module globals: a concurrent reader (UI thread) or the next job
    cannot see another generation's branches.
    """

    def __init__(self, settings: Settings, plan: BranchPlan | None = None):
        self.settings = settings
        self.plan = plan or BranchPlan()
        self.branches: list[Branch] = []
        self.skipped: dict[str, str] = dict(self.plan.skipped)
        self.partial: dict[str, str] = {}  # name -> why only some of its layers are composed
        self.notes: list[str] = []
        self.refused: str | None = None  # set when LoRAtorio does not run at all
        self.error: BaseException | None = None
        self.composer = None
        self.router = None
        self.maps: list[tuple[torch.Tensor, list[str]]] = []  # per image: (weights [N, H, W], names)
        self.dropped: dict[str, int] = {}
        self.base_nonfinite = 0  # model calls whose own (base) prediction was NaN/inf
        self.extra: dict = {}  # host-specific per-generation data

    @classmethod
    def start(cls, settings: Settings, prompt: str, bridge: HostBridge, cache: AdapterCache | None) -> GenerationState:
        """A state for ``settings`` with the branches of ``prompt`` (the batch's first prompt) loaded."""
        state = cls(settings)
        state.load(prompt, bridge, cache)
        return state

    def load(self, prompt: str, bridge: HostBridge, cache: AdapterCache | None) -> bool:
        """Plan and load the branches of a batch whose first prompt is ``prompt``.

        Returns True when the branches differ from the previous batch's (the host then
        rebuilds its router). Each LoRA keeps the outcome of the latest batch that names
        it (composed, composed in part, or skipped with a reason); LoRAs of earlier
        batches' prompts keep theirs.
        """
        plan = plan_branches(parse_lora_tags(prompt), self.settings, bridge.default_multiplier)
        self.plan = plan
        skipped = dict(plan.skipped)
        partial: dict[str, str] = {}
        if cache is not None:
            cache.use_model(bridge.model_key())
        branches = load_branches(plan, bridge, cache, skipped, partial)
        unet_targets = bridge.unet_targets()
        te_targets = bridge.te_targets()
        fitting = []
        for branch in branches:
            problem = (check_fit(branch.unet, unet_targets) or check_fit(branch.te, te_targets)
                       or check_fit(branch.te_merge, te_targets, packed=True))
            if problem:
                skipped[branch.name] = Reason.misfit(problem)
                partial.pop(branch.name, None)
            else:
                fitting.append(branch)
        for name in {s.name for s in plan.branches} | set(skipped):
            self.skipped.pop(name, None)
            self.partial.pop(name, None)
        self.skipped.update(skipped)
        self.partial.update(partial)
        changed = [(b.spec, b.file) for b in fitting] != [(b.spec, b.file) for b in self.branches]
        self.branches = fitting
        note = "no LoRA to compose; plain generation"
        if not fitting and note not in self.notes:
            self.notes.append(note)
        return changed

    @property
    def names(self) -> list[str]:
        return [b.name for b in self.branches]

    @property
    def composed_names(self) -> list[str]:
        """Tag names this extension composes (the built-in LoRA must leave them alone)."""
        return [b.name for b in self.branches if b.spec.source == "prompt"]

    @property
    def handled_names(self) -> set[str]:
        """Every tagged name that must not reach the built-in LoRA (composed or skipped)."""
        merged = set(self.plan.merged) | set(self.settings.merge_into_base)
        return ({s.name for s in self.plan.branches if s.source == "prompt"} | set(self.skipped)) - merged

    @property
    def active(self) -> bool:
        return self.refused is None and self.error is None and bool(self.branches)

    def refuse(self, reason: str) -> None:
        """LoRAtorio does not run for this generation; the generation goes on without it."""
        self.refused = reason
        self.notes.append(f"not applied: {reason}")

    def new_composer(self):
        """A fresh :class:`loratorio.engine.Composer` for a batch of images (or a new sampling pass)."""
        from .engine import Composer

        self.composer = Composer.from_settings(self.names, self.settings)
        return self.composer

    def record_map(self, rows: Sequence[int] | None = None) -> None:
        """Keep the composition map of the current composer's images (``mean_weights``).

        ``rows``: the fused row of each image (its first sub-prompt when a prompt uses
        AND); default one row per image.
        """
        if self.composer is None or not self.settings.composition_map:
            return
        weights = self.composer.mean_weights()
        if weights is None:
            return
        for b in (range(weights.shape[1]) if rows is None else rows):
            self.maps.append((weights[:, b].detach().float().cpu(), list(self.names)))

    def count_dropped(self) -> None:
        """Move the composer's counts of non-finite steps (per LoRA, and of the base) into the state."""
        composer = self.composer
        if composer is None:
            return
        for name, n in dict(getattr(composer, "dropped", {}) or {}).items():
            self.dropped[name] = self.dropped.get(name, 0) + int(n)
        self.base_nonfinite += int(getattr(composer, "base_nonfinite", 0) or 0)
        if hasattr(composer, "dropped"):
            composer.dropped.clear()
        composer.base_nonfinite = 0

    def _base_note(self) -> list[str]:
        if not self.base_nonfinite:
            return []
        return [f"the model's own prediction was not finite at {self.base_nonfinite} step(s), so nothing was "
                "composed there; this happens without LoRAtorio too (lower the CFG scale or check the model)"]

    def infotext(self) -> dict[str, str]:
        """Infotext entries: the settings plus composed, skipped and dropped LoRAs and notes."""
        if not self.settings.enabled:
            return {}
        d = self.settings.to_infotext()
        if self.branches and self.refused is None:
            d[INFOTEXT_KEYS["loras"]] = join_names(self.names)
        if self.skipped:
            d[INFOTEXT_KEYS["skipped"]] = "; ".join(f"{k}: {v}" for k, v in self.skipped.items())
        if self.dropped:
            d[INFOTEXT_KEYS["dropped"]] = "; ".join(f"{k}: {v}" for k, v in self.dropped.items())
        notes = self._partial_notes() + self._base_note() + self.notes
        if self.error is not None:
            notes.append(f"stopped by an error: {self.error}")
        if notes:
            d[INFOTEXT_KEYS["note"]] = "; ".join(notes)
        return d

    def report(self) -> str:
        """One paragraph for the user (UI comment / console)."""
        parts = []
        if self.branches and self.refused is None:
            parts.append(f"composing {len(self.branches)} LoRA(s): {join_names(self.names)}")
        for name, reason in self.skipped.items():
            parts.append(f"skipped {name}: {reason}")
        for name, n in self.dropped.items():
            parts.append(f"{name} gave non-finite output at {n} step(s), left out there")
        parts.extend(self._partial_notes())
        parts.extend(self._base_note())
        parts.extend(self.notes)
        if self.error is not None:
            parts.append(f"stopped by an error: {self.error}")
        return "LoRAtorio: " + "; ".join(parts) if parts else ""

    def _partial_notes(self) -> list[str]:
        names = set(self.names)
        return [f"{name}: {why}" for name, why in self.partial.items() if name in names and self.refused is None]

    def close(self) -> None:
        """Drop the per-generation objects that hold device memory (routers, conds)."""
        self.router = None
        self.composer = None
        self.extra.clear()


def get_state(p) -> GenerationState | None:
    return getattr(p, STATE_ATTR, None)


def usable(state: GenerationState | None) -> bool:
    """Whether the generation's state may still compose (not refused, no error so far)."""
    return state is not None and state.refused is None and state.error is None


def tags_of(prompt: str) -> list[LoraTag]:
    return parse_lora_tags(prompt).tags
