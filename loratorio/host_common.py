"""Host-neutral glue shared by the WebUI adapters (``host_a1111``, ``host_forge``).

Imports no host code at module level (gradio and the host's ``modules`` only inside the
UI/settings/XYZ helpers at the end). It turns a prompt's LoRA tags and the user's
settings into the branches of one generation, loads their adapters through a cache,
keeps the per-generation state on the processing object, lays out the branch rows of
the extra model calls, and writes the infotext and the user-facing report.

What a host module supplies
---------------------------
A :class:`HostBridge` subclass (created per generation) with

- ``model_key()``: a hashable identity of the loaded model; a change drops the cache;
- ``find_lora(name) -> LoraFile | None``: resolve a tag name as the host's LoRA list does;
- ``available_loras() -> list[str]``: names for the pool / merge dropdowns;
- ``load_lora(lora_file) -> LoadedLora``: the file's adapters at multiplier 1 (UNet and
  text encoder, keyed by the names of ``unet_targets`` / ``te_targets``; pieces for
  packed parameters that hooks cannot reach go to ``te_merge``); raise on failure;
- ``unet_targets()`` / ``te_targets()``: module name -> module that adapters may use;
- ``default_multiplier``: the multiplier of pool LoRAs (they have no tag);

plus, in the host module itself, the lifecycle functions the script calls (each takes
the processing object and the script's arguments; missing ones are skipped):
``register_callbacks()`` (once per script load), ``process(p, *args)``,
``before_process_batch(p, *args, prompts, ...)``, ``after_extra_networks_activate(p,
*args, extra_network_data, ...)``, ``process_batch(p, *args, ...)``,
``process_before_every_sampling(p, *args, ...)``, ``postprocess_image(p, pp, *args)``,
``postprocess_batch(p, *args, images, ...)``, ``postprocess(p, processed, *args)``, and
``lora_names()`` / ``refresh_loras()`` for the UI. Keeping the built-in LoRA off the
composed tags and the per-step hook are host code.

Flow of one generation (host code in brackets)::

    settings = settings_for(p, args, shared.opts)          # SettingsError -> refuse the job
    state = GenerationState(settings); p.loratorio_state = state
    state.load(first_prompt_of_batch, bridge, cache)       # branches; skip reasons collected
    [keep the built-in LoRA off state.handled_names]
    state.new_composer()                                   # per batch of images
    [per-branch text conds; per step: state.composer.active(step), plan_calls/call_rows,
     one routed model call per chunk, state.composer.fuse(...), in-place write-back]
    state.record_map(); state.count_dropped()
    p.extra_generation_params.update(state.infotext())
    state.close()                                          # in a finally block
"""

from __future__ import annotations

import copy
import html
import json
import math
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from .fusion import METHODS
from .lora import Dense, LowRank, OutputSlice, pieces
from .settings import INFOTEXT_KEYS, LABELS, UI_ORDER, Settings, SettingsError, join_names
from .tags import LoraTag, TagParse, parse_lora_tags

__all__ = [
    "STATE_ATTR",
    "AdapterCache",
    "Branch",
    "BranchPlan",
    "BranchSpec",
    "GenerationState",
    "HostBridge",
    "LoadedLora",
    "LoraFile",
    "LoraLoadError",
    "Reason",
    "call_rows",
    "check_fit",
    "get_state",
    "plan_branches",
    "plan_calls",
    "refusal_text",
    "report_after_images",
    "scaled_set",
    "show_report",
    "show_under_images",
    "truncate_rank",
]

STATE_ATTR = "loratorio_state"


class LoraLoadError(RuntimeError):
    """A LoRA file could not be turned into adapters (message says why, for the user)."""


class Reason:
    """User-facing reasons a LoRA (or, for ``REFINER``, the whole generation) is not composed.

    Used in the UI report and the infotext.
    """

    NOT_FOUND = "not found in the LoRA folders (check the name, or refresh the LoRA list)"
    DUPLICATE = "named twice; only the first tag is used"
    SAME_FILE = "is the same file as {other}; only the first is used"
    ZERO = "multipliers are 0, nothing to compose"
    NO_MATCH = "matches no layer of this model (a LoRA for another model type?)"
    NON_FINITE = "contains NaN or infinite values"
    MERGED_NOT_IN_PROMPT = "is in 'merge into base' but not in the prompt; add its tag to apply it"
    REFINER = ("a refiner is set; LoRAtorio composes branches of one model and cannot follow a checkpoint switch "
               "during sampling. Turn the refiner off to use LoRAtorio")

    @staticmethod
    def not_a_lora(n_tensors: int) -> str:
        """The loader's message for a file with tensors but no LoRA-type key (a checkpoint, a VAE, ...)."""
        return (f"not a LoRA file: none of its {n_tensors} tensors has a LoRA key "
                "(lora_up/lora_down, lora_A/lora_B, hada_, lokr_, ...)")

    @staticmethod
    def partial(matched: int, total: int) -> str:
        return f"only {matched} of its {total} layers match this model (a LoRA for another model version?)"

    @staticmethod
    def misfit(problem: str) -> str:
        return f"does not fit this model ({problem}; a LoRA for another model type?)"

    @staticmethod
    def load_failed(exc: BaseException) -> str:
        text = str(exc).strip() or type(exc).__name__
        return f"could not be loaded ({text})"

    @staticmethod
    def invalid_tag(reason: str) -> str:
        return f"tag not understood: {reason}"


# -- files and adapters ----------------------------------------------------------------------


@dataclass(frozen=True)
class LoraFile:
    """A LoRA on disk; a replaced file is a different cache key.

    ``mtime_ns`` and ``size`` catch ordinary replacements; ``inode`` and ``ctime_ns``
    also catch copies that keep the old size and modification time (``cp -p``,
    ``rsync -t``, unzip), since the replacement is a new file or a changed one.
    """

    name: str
    path: str
    mtime_ns: int = 0
    size: int = 0
    inode: int = 0
    ctime_ns: int = 0

    @classmethod
    def at(cls, name: str, path: str) -> LoraFile:
        try:
            st = os.stat(path)
        except OSError:
            return cls(name, os.path.abspath(path))
        return cls(name, os.path.abspath(path), st.st_mtime_ns, st.st_size, st.st_ino, st.st_ctime_ns)

    @property
    def key(self) -> tuple:
        return (self.path, self.mtime_ns, self.size, self.inode, self.ctime_ns)


@dataclass
class LoadedLora:
    """Adapters of one LoRA file at multiplier 1 (``scale`` = alpha / rank only).

    ``unet`` and ``te`` are adapter sets keyed by target module names; ``te_merge`` holds
    pieces for packed text-encoder parameters that output hooks cannot reach (the host
    merges them temporarily around the text-encoder pass); ``layers`` counts the file's
    LoRA layers (0: not known) and ``unmatched`` those of them that give no adapter for
    this model; ``kinds`` names the module types.
    """

    unet: dict = field(default_factory=dict)
    te: dict = field(default_factory=dict)
    te_merge: dict = field(default_factory=dict)
    unmatched: int = 0
    kinds: set = field(default_factory=set)
    layers: int = 0

    @property
    def matched_fraction(self) -> tuple[int, int] | None:
        """``(matched, total)`` layers when some of a known number are left out, else None."""
        if self.layers <= 0 or self.unmatched <= 0:
            return None
        return max(0, self.layers - self.unmatched), self.layers

    @property
    def nbytes(self) -> int:
        return sum(p.nbytes for s in (self.unet, self.te, self.te_merge) for e in s.values() for p in pieces(e))

    @property
    def empty(self) -> bool:
        return not (self.unet or self.te or self.te_merge)

    def all_finite(self) -> bool:
        for s in (self.unet, self.te, self.te_merge):
            for entry in s.values():
                for piece in pieces(entry):
                    if not all(torch.isfinite(t).all() for t in _tensors(piece)):
                        return False
        return True


def _tensors(piece) -> list[torch.Tensor]:
    if isinstance(piece, OutputSlice):
        return _tensors(piece.inner)
    if isinstance(piece, LowRank):
        return [t for t in (piece.down, piece.up, piece.mid) if t is not None]
    return [t for t in (piece.delta_tensor, piece.bias) if t is not None]


def _scaled_piece(piece, factor: float):
    if isinstance(piece, OutputSlice):
        return OutputSlice(_scaled_piece(piece.inner, factor), piece.offset, piece.size)
    out = copy.copy(piece)  # shares the tensors; only the scalar changes
    out.scale = piece.scale * factor
    if isinstance(out, Dense) and out.bias is not None:
        # Dense has no separate bias scale; the bias delta follows the multiplier too
        out.bias = out.bias * factor
    return out


def scaled_set(adapter_set: Mapping, factor: float) -> dict:
    """The adapter set with every piece's ``scale`` multiplied by ``factor`` (tensors shared)."""
    out = {}
    for name, entry in adapter_set.items():
        items = [_scaled_piece(p, factor) for p in pieces(entry)]
        out[name] = items[0] if len(items) == 1 else items
    return out


def truncate_rank(adapter_set: Mapping, rank: int | None) -> dict:
    """Keep the first ``rank`` components of low-rank pieces (the tag's ``dyn`` value).

    The scale is left as loaded (alpha over the file's rank), as the WebUI's own loader
    does. Tucker and dense pieces are kept whole.
    """
    if not rank:
        return dict(adapter_set)

    def cut(piece):
        if isinstance(piece, OutputSlice):
            return OutputSlice(cut(piece.inner), piece.offset, piece.size)
        if isinstance(piece, LowRank) and piece.mid is None and piece.rank > rank:
            return LowRank(piece.down[:rank], piece.up[:, :rank], piece.scale)
        return piece

    out = {}
    for name, entry in adapter_set.items():
        items = [cut(p) for p in pieces(entry)]
        out[name] = items[0] if len(items) == 1 else items
    return out


class AdapterCache:
    """Loaded LoRAs kept across generations, bounded in MB, least recently used evicted first.

    Keyed by file path, modification time and size, so a file replaced on disk is
    loaded again. Everything is dropped when the model changes (adapters name the
    model's modules, and some deltas depend on its weights). ``max_mb = 0`` keeps nothing.
    """

    def __init__(self, max_mb: float = 1024.0):
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple, LoadedLora] = OrderedDict()
        self._model: Hashable = None
        self.max_mb = float(max_mb)

    def set_limit(self, max_mb: float) -> None:
        with self._lock:
            self.max_mb = max(0.0, float(max_mb))
            self._evict()

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    def use_model(self, model_key: Hashable) -> None:
        """Drop everything when ``model_key`` differs from the last model seen."""
        with self._lock:
            if model_key != self._model:
                self._items.clear()
                self._model = model_key

    @property
    def nbytes(self) -> int:
        with self._lock:
            return sum(v.nbytes for v in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def __contains__(self, lora_file: LoraFile) -> bool:
        return lora_file.key in self._items

    def get(self, lora_file: LoraFile, loader: Callable[[LoraFile], LoadedLora]) -> LoadedLora:
        with self._lock:
            hit = self._items.get(lora_file.key)
            if hit is not None:
                self._items.move_to_end(lora_file.key)
                return hit
        loaded = loader(lora_file)
        with self._lock:
            # an older version of the same file is stale now
            for key in [k for k in self._items if k[0] == lora_file.path]:
                del self._items[key]
            if loaded.nbytes <= self.max_mb * 2**20:
                self._items[lora_file.key] = loaded
                self._evict()
        return loaded

    def _evict(self) -> None:
        limit = self.max_mb * 2**20
        total = sum(v.nbytes for v in self._items.values())
        while self._items and total > limit:
            _, dropped = self._items.popitem(last=False)
            total -= dropped.nbytes


class HostBridge:
    """What a host module provides to :class:`GenerationState` (see the module docstring)."""

    default_multiplier: float = 1.0  # multiplier of pool LoRAs (no tag to give one)

    def model_key(self) -> Hashable:
        raise NotImplementedError

    def find_lora(self, name: str) -> LoraFile | None:
        raise NotImplementedError

    def available_loras(self) -> list[str]:
        raise NotImplementedError

    def load_lora(self, lora_file: LoraFile) -> LoadedLora:
        raise NotImplementedError

    def unet_targets(self) -> Mapping[str, torch.nn.Module]:
        raise NotImplementedError

    def te_targets(self) -> Mapping[str, torch.nn.Module]:
        raise NotImplementedError


# -- branches ------------------------------------------------------------------------------


@dataclass(frozen=True)
class BranchSpec:
    """A LoRA the user asked to compose, before its file is looked at."""

    name: str
    te: float = 1.0
    unet: float = 1.0
    dyn: int | None = None
    source: str = "prompt"  # "prompt" (a tag) or "pool"


@dataclass
class BranchPlan:
    branches: list[BranchSpec] = field(default_factory=list)
    merged: list[str] = field(default_factory=list)  # tags left to the built-in LoRA
    skipped: dict[str, str] = field(default_factory=dict)  # name (or tag text) -> reason


def plan_branches(tags: TagParse | str, settings: Settings, default_multiplier: float = 1.0) -> BranchPlan:
    """Which LoRAs become branches: prompt tags in order, then the pool.

    Tags named in ``merge_into_base`` stay with the built-in LoRA; a name given twice is
    composed once; a tag with both multipliers 0 is skipped; pool names already tagged
    keep the tag's multipliers. Names are not resolved to files here.
    """
    if isinstance(tags, str):
        tags = parse_lora_tags(tags)
    plan = BranchPlan()
    merge = set(settings.merge_into_base)
    for text, reason in tags.invalid:
        plan.skipped[text] = Reason.invalid_tag(reason)
    for tag in tags.duplicates:
        if tag.name not in merge:
            # keyed by the tag's text: the name itself is composed (its first tag)
            plan.skipped.setdefault(tag.text or tag.name, Reason.DUPLICATE)
    names = []
    for tag in tags.tags:
        names.append(tag.name)
        if tag.name in merge:
            plan.merged.append(tag.name)
        elif tag.te == 0 and tag.unet == 0:
            plan.skipped[tag.name] = Reason.ZERO
        else:
            plan.branches.append(BranchSpec(tag.name, tag.te, tag.unet, tag.dyn, "prompt"))
    for name in settings.merge_into_base:
        if name not in names:
            plan.skipped[name] = Reason.MERGED_NOT_IN_PROMPT
    for name in settings.pool:
        if name not in names:
            m = float(default_multiplier)
            plan.branches.append(BranchSpec(name, m, m, None, "pool"))
    return plan


@dataclass
class Branch:
    """A branch ready to run: its spec, file and adapters with the multipliers applied."""

    spec: BranchSpec
    file: LoraFile
    unet: dict
    te: dict
    te_merge: dict

    @property
    def name(self) -> str:
        return self.spec.name


def load_branches(plan: BranchPlan, bridge: HostBridge, cache: AdapterCache | None,
                  skipped: dict[str, str], partial: dict[str, str] | None = None) -> list[Branch]:
    """Resolve and load every planned branch; failures go to ``skipped`` (name -> reason).

    A LoRA of which only some layers match the model is composed with those when at
    least half match (the reason goes to ``partial``, reported as a note), and skipped
    otherwise: a file mostly for another model would be a branch of stray layers.
    """
    out: list[Branch] = []
    by_path: dict[str, str] = {}
    for spec in plan.branches:
        lora_file = bridge.find_lora(spec.name)
        if lora_file is None:
            skipped[spec.name] = Reason.NOT_FOUND
            continue
        if lora_file.path in by_path:
            skipped[spec.name] = Reason.SAME_FILE.format(other=by_path[lora_file.path])
            continue
        try:
            loaded = cache.get(lora_file, bridge.load_lora) if cache is not None else bridge.load_lora(lora_file)
        except Exception as exc:  # a corrupt file must not stop the other branches
            skipped[spec.name] = Reason.load_failed(exc)
            continue
        if loaded.empty:
            skipped[spec.name] = Reason.NO_MATCH
            continue
        if not loaded.all_finite():
            skipped[spec.name] = Reason.NON_FINITE
            continue
        fraction = loaded.matched_fraction
        if fraction is not None:
            matched, total = fraction
            if 2 * matched < total:
                skipped[spec.name] = Reason.partial(matched, total)
                continue
            if partial is not None:
                partial[spec.name] = Reason.partial(matched, total)
        by_path[lora_file.path] = spec.name
        out.append(Branch(
            spec=spec,
            file=lora_file,
            unet=truncate_rank(scaled_set(loaded.unet, spec.unet), spec.dyn),
            te=truncate_rank(scaled_set(loaded.te, spec.te), spec.dyn),
            te_merge=truncate_rank(scaled_set(loaded.te_merge, spec.te), spec.dyn),
        ))
    return out


def _weight_shape(module, packed: bool) -> tuple[int, ...] | None:
    if packed and getattr(module, "in_proj_weight", None) is not None:
        weight = module.in_proj_weight
    else:
        weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        return None
    # 4-bit quantised weights (bitsandbytes NF4/FP4) store packed bytes; the logical
    # shape is kept on their quant state.
    logical = getattr(getattr(weight, "quant_state", None), "shape", None)
    return tuple(logical) if logical is not None else tuple(weight.shape)


def _piece_fit(piece, shape: tuple[int, ...]) -> str | None:
    out_f, in_f, kernel = shape[0], shape[1], tuple(shape[2:]) or (1, 1)
    if isinstance(piece, OutputSlice):
        if piece.offset + piece.size > out_f:
            return f"output slice {piece.offset}:{piece.offset + piece.size} beyond {out_f} features"
        piece, out_f = piece.inner, piece.size
    if piece.out_features != out_f or piece.in_features != in_f:
        return f"[{piece.out_features}, {piece.in_features}] for a [{out_f}, {in_f}] layer"
    if tuple(piece.kernel_size) != kernel:
        return f"kernel {tuple(piece.kernel_size)} for a {kernel} layer"
    return None


def check_fit(adapter_set: Mapping, targets: Mapping[str, torch.nn.Module], packed: bool = False) -> str | None:
    """Why ``adapter_set`` cannot apply to ``targets`` (first problem found), or None when it fits.

    ``packed``: the pieces merge into a packed projection (``in_proj_weight`` when the
    module has one) instead of being routed.
    """
    for name, entry in adapter_set.items():
        module = targets.get(name)
        if module is None:
            return f"layer {name} not in this model"
        shape = _weight_shape(module, packed)
        if shape is None or len(shape) not in (2, 4):
            return f"layer {name} has no linear or convolution weight"
        for piece in pieces(entry):
            problem = _piece_fit(piece, shape)
            if problem:
                return f"layer {name}: {problem}"
    return None


# -- rows of the extra model calls ----------------------------------------------------------


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


def refusal_text(message: str) -> str:
    """A refused job's console and UI line: the message with one ``LoRAtorio:`` prefix where it names none."""
    return message if message.startswith("LoRAtorio") else f"LoRAtorio: {message}"


def _report_error(text: str) -> None:
    """``text`` with the current exception's traceback in the WebUI's error log (the console without it)."""
    try:
        from modules import errors

        errors.report(text, exc_info=True)
    except Exception:
        print(text)


def _interrupt_job() -> None:
    """Stop the WebUI job: a script hook's exception does not stop a generation by itself,
    so the sampler is told to stop at its next model call."""
    from modules import shared

    shared.state.interrupt()


def refuse_job(p, message: str) -> None:
    """Invalid settings: no image is made; the reason goes to the console, the comments and the infotext."""
    text = refusal_text(message)
    print(text)
    comment(p, text)
    p.extra_generation_params[INFOTEXT_KEYS["note"]] = f"refused: {message}"
    _interrupt_job()


def stop_generation(p, state: GenerationState | None, exc: BaseException, where: str,
                    release: Callable[[object, GenerationState], None] | None = None) -> None:
    """An error inside a host adapter's hooks: stop the generation cleanly and say why.

    Routing is already off (every router leaves on exit). ``release`` undoes what the host
    attached for the current sampling pass before the state is closed.
    """
    text = f"LoRAtorio stopped the generation ({where}): {type(exc).__name__}: {exc}"
    _report_error(text)
    if state is not None:
        state.error = exc
        if release is not None:
            release(p, state)
        p.extra_generation_params.update(state.infotext())
        state.close()
    comment(p, text)
    _interrupt_job()


def report_after_images(p, processed, exc: BaseException, step: str) -> str:
    """Report an error of the last hook (``postprocess``), when the images are already made.

    The generation is not stopped (nothing is left to stop) and its images are kept; the
    error goes to the console with its traceback, under the images (:func:`show_under_images`)
    and into the infotext note of later reads of ``p.extra_generation_params``. Returns the
    message.
    """
    text = f"LoRAtorio: {step} failed after the images were made: {type(exc).__name__}: {exc}"
    _report_error(text)
    show_under_images(p, processed, text)
    params = getattr(p, "extra_generation_params", None)
    if isinstance(params, dict):
        note = INFOTEXT_KEYS["note"]
        params[note] = "; ".join(filter(None, [params.get(note), f"{step} failed: {exc}"]))
    return text


def get_state(p) -> GenerationState | None:
    return getattr(p, STATE_ATTR, None)


def tags_of(prompt: str) -> list[LoraTag]:
    return parse_lora_tags(prompt).tags


# -- lifecycle helpers both host adapters use ------------------------------------------------


def comment(p, text: str) -> None:
    """Add ``text`` to the processing object's comments, which the UI shows under the images.

    Only from a hook that runs before the WebUI builds its result (``process`` up to
    ``postprocess_batch``); from ``postprocess`` use :func:`show_under_images`.
    """
    fn = getattr(p, "comment", None)
    if callable(fn):
        fn(text)


def show_under_images(p, processed, text: str) -> None:
    """Show ``text`` under the images from ``postprocess``, once.

    The WebUI copies ``p.comments`` into the result's ``comments`` string (what the UI
    shows) when it builds the result, and runs the scripts' ``postprocess`` only after
    that (A1111 1.6-1.10 ``processing.py``: ``Processed.__init__`` :525, built at :1137,
    ``postprocess`` at :1148; Forge the same at :528, :1144, :1156). So a line written
    here goes into the result itself; ``p.comments`` gets it too, for code that reads it.
    """
    comment(p, text)
    shown = getattr(processed, "comments", None)
    if not isinstance(shown, str) or text in shown.splitlines():
        return
    if shown and not shown.endswith("\n"):
        shown += "\n"
    processed.comments = f"{shown}{text}\n"


def show_report(p, processed, state: GenerationState) -> None:
    """``postprocess``: the generation's report (composed, skipped, dropped, notes) under the images.

    Not for a generation LoRAtorio refused or stopped: that line was shown when it
    happened, and the infotext has the rest.
    """
    if state.refused is not None or state.error is not None:
        return
    report = state.report()
    if report:
        show_under_images(p, processed, report)


def usable(state: GenerationState | None) -> bool:
    """Whether the generation's state may still compose (not refused, no error so far)."""
    return state is not None and state.refused is None and state.error is None


def _hash_key(name: str) -> str:
    """A LoRA's name as the built-in writes it in "Lora hashes" (no ``:`` or ``,``)."""
    return name.replace(":", "").replace(",", "")


def set_lora_hashes(p, state: GenerationState, nets, opts) -> None:
    """Make "Lora hashes" list exactly the LoRAs that act in this generation, as the built-in writes them.

    The built-in hashes every tag it could load, before the host adapter takes the
    composed tags away. That list loses the tags LoRAtorio skipped (they act nowhere) and
    gains the pool LoRAs plus any composed tag the built-in left out (Forge's built-in
    stops at the first file it cannot load). ``nets`` is the host's LoRA module, with
    ``available_network_aliases`` / ``available_networks`` entries that have
    ``read_hash()`` and ``shorthash``.
    """
    if not getattr(opts, "lora_add_hashes_to_infotext", True):
        return
    hashes = dict(getattr(p, "lora_hashes", None) or {})
    before = dict(hashes)
    acting = {_hash_key(b.name) for b in state.branches}
    for name in state.skipped:
        key = _hash_key(name)
        if key not in acting:
            hashes.pop(key, None)
    for branch in state.branches:
        key = _hash_key(branch.name)
        entry = nets.available_network_aliases.get(branch.name) or nets.available_networks.get(branch.name)
        if key in hashes or entry is None:
            continue
        entry.read_hash()
        if entry.shorthash:
            hashes[key] = entry.shorthash
    if hashes == before:
        return
    p.lora_hashes = hashes
    if hashes:
        p.extra_generation_params["Lora hashes"] = ", ".join(f"{k}: {v}" for k, v in hashes.items())
    else:
        p.extra_generation_params.pop("Lora hashes", None)


def start_generation(p, args: Sequence, opts, cache: AdapterCache, *, guarded: Callable,
                     refusal: Callable[[object], str | None]) -> GenerationState | None:
    """The ``process`` hook of both hosts: read the settings and put a fresh state on ``p``.

    Settings that do not validate refuse the whole job (:func:`refuse_job`).
    A job LoRAtorio cannot serve (``refusal`` gives the reason) goes on without it, with a
    note. Errors inside are handled by the host's ``guarded(p, where)`` context manager.
    Returns the state, or None when LoRAtorio is off or the job was refused.
    """
    setattr(p, STATE_ATTR, None)
    try:
        settings = settings_for(p, args, opts)
    except SettingsError as exc:
        refuse_job(p, str(exc))
        return None
    if not settings.enabled:
        return None
    state = GenerationState(settings)
    setattr(p, STATE_ATTR, state)
    with guarded(p, "process"):
        cache.set_limit(cache_limit_mb(opts))
        reason = refusal(p)
        if reason:
            state.refuse(reason)
            comment(p, f"LoRAtorio: {reason}; generating without it")
        p.extra_generation_params.update(state.infotext())
    return state


def keep_image_for_map(p, pp, *script_args) -> None:
    """``postprocess_image``: remember each finished image the composition map is drawn over."""
    state = get_state(p)
    if state is not None and state.settings.composition_map and state.composer is not None:
        state.extra.setdefault("images", []).append(pp.image)


def append_maps(state: GenerationState, processed) -> None:
    """Add one composition map per generated image after the images, with the image's infotext."""
    from .compmap import render_map

    images = state.extra.get("images") or []
    first = getattr(processed, "index_of_first_image", 0)
    infotexts = getattr(processed, "infotexts", None)
    for i, (weights, names) in enumerate(state.maps):
        if i < len(images):
            base = images[i]
        elif first + i < len(processed.images):
            base = processed.images[first + i]
        else:
            break
        processed.images.append(render_map(base, weights, names))
        if infotexts is not None and len(infotexts) > first + i:
            infotexts.append(infotexts[first + i])


# -- WebUI pieces shared by both hosts (gradio and the host's modules imported lazily) ----------

CACHE_OPTION = "loratorio_cache_mb"
CACHE_DEFAULT_MB = 1024
OPTION_KEYS: dict[str, str] = {
    name: f"loratorio_default_{name}"
    for name in ("temperature_scale", "patch_size", "top_k", "probe_every",
                 "text_encoder_per_branch", "composition_map", "max_rows_per_call", "method")
}
# A new key for lambda: the WebUI keeps every applied setting, and the 0.5 stored by versions
# before the methods would give the default method a negative that lets guidance burn images.
OPTION_KEYS["recenter"] = "loratorio_default_lambda"
XYZ_PREFIX = "[LoRAtorio] "
OVERRIDES_ATTR = "loratorio_overrides"  # set on the processing object by XYZ axes


def configured_defaults(opts) -> Settings:
    """The defaults from the WebUI's settings page (built-in defaults where unset or invalid)."""
    values = Settings().to_dict()
    for name, key in OPTION_KEYS.items():
        try:
            value = getattr(opts, key)
        except AttributeError:
            continue
        if value is not None:
            values[name] = value
    try:
        return Settings(**values).validate()
    except (SettingsError, TypeError):
        return Settings()


def cache_limit_mb(opts) -> float:
    try:
        value = float(getattr(opts, CACHE_OPTION))
    except (AttributeError, TypeError, ValueError):
        return float(CACHE_DEFAULT_MB)
    return max(0.0, value) if math.isfinite(value) else float(CACHE_DEFAULT_MB)


def settings_for(p, args: Sequence, opts) -> Settings:
    """Settings of a generation: script arguments, then any XYZ-axis overrides on ``p``.

    Raises :class:`SettingsError` for invalid values from either source.
    """
    settings = Settings.from_args(args, defaults=configured_defaults(opts))
    overrides = getattr(p, OVERRIDES_ATTR, None)
    if overrides:
        settings = Settings.from_dict({**settings.to_dict(), **overrides})
    return settings


# minimum, maximum, step of each slider, in the accordion and on the settings page
SLIDER_RANGES: dict[str, tuple[float, float, float]] = {
    "recenter": (0.0, 1.0, 0.05),
    "temperature_scale": (0.5, 100.0, 0.5),
    "patch_size": (1, 16, 1),
    "top_k": (0, 16, 1),
    "probe_every": (1, 20, 1),
    "max_rows_per_call": (0, 64, 1),
}
# What a 0 means, where the label has no room for it (the settings page shows it under the label).
ZERO_MEANS = {"top_k": "0 = all LoRAs share every patch", "max_rows_per_call": "0 = no limit (all rows in one call)"}
LORA_LISTS = ("pool", "merge_into_base")  # multiselect dropdowns of LoRA names, with a refresh button
SWITCHES = ("text_encoder_per_branch", "composition_map")
# The accordion's rows, one kind of control each. Two per row keep every label on one line
# in the WebUI's default column width, so the controls of a row line up.
UI_ROWS = (
    ("method",),
    ("recenter", "temperature_scale"),
    ("patch_size", "top_k"),
    ("probe_every", "max_rows_per_call"),
    LORA_LISTS,
    SWITCHES,
)


def register_options(shared) -> None:
    """The "LoRAtorio" section of the WebUI settings: defaults of the UI and the cache bound."""
    import gradio as gr

    section = ("loratorio", "LoRAtorio")
    d = Settings()

    def add(key, default, label, component, args=None, info=None):
        option = shared.OptionInfo(default, label, component, args or {}, section=section)
        if info and hasattr(option, "info"):
            option = option.info(info)
        shared.opts.add_option(key, option)

    add(CACHE_OPTION, CACHE_DEFAULT_MB, "LoRA weight cache (MB)", gr.Number, {"precision": 0, "minimum": 0},
        "LoRAs loaded for composition stay in memory across generations up to this size; 0 = load every time")
    for name, (minimum, maximum, step) in SLIDER_RANGES.items():
        add(OPTION_KEYS[name], getattr(d, name), "Default " + LABELS[name], gr.Slider,
            {"minimum": minimum, "maximum": maximum, "step": step}, ZERO_MEANS.get(name))
    for name in SWITCHES:
        add(OPTION_KEYS[name], getattr(d, name), "Default " + LABELS[name], gr.Checkbox)
    add(OPTION_KEYS["method"], d.method, "Default " + LABELS["method"], gr.Radio, {"choices": list(METHODS)},
        "paper = the published LoRAtorio step exactly; the README compares the methods")


KNOWN_LORAS_ATTR = "data-loratorio-loras"


def tag_names(lora_names: Callable[[], list[str]]) -> list[str]:
    """Every name a ``<lora:...>`` tag can use: the LoRA list plus the aliases the built-in LoRA accepts.

    Both WebUIs' built-in LoRA module is importable as ``networks``; an alias another file
    also uses is "forbidden" there and resolves by file name only.
    """
    try:
        names = set(lora_names())
    except Exception:  # a broken LoRA folder must not take the UI down
        names = set()
    try:
        import networks

        forbidden = getattr(networks, "forbidden_network_aliases", {})
        names.update(a for a in networks.available_network_aliases if a.lower() not in forbidden)
    except Exception:
        pass
    return sorted(names)


def known_loras_html(names: Sequence[str]) -> str:
    """The hidden element the page script reads the known LoRA names from (to mark unknown tags)."""
    return f'<div {KNOWN_LORAS_ATTR}="{html.escape(json.dumps(list(names)), quote=True)}"></div>'


def build_ui(script, is_img2img: bool, defaults: Settings, lora_names: Callable[[], list[str]],
             refresh: Callable[[], None] | None = None) -> list:
    """The accordion and its components, in ``UI_ORDER``; also sets the script's paste fields.

    Element ids: ``loratorio_<tab>`` for the accordion, ``loratorio_<tab>_<field>`` for
    each component (tab = txt2img / img2img), ``loratorio_<tab>_known_loras`` for the
    hidden list of LoRA names the header summary checks tags against. Free of side
    effects beyond the script's own attributes (the API calls ``ui()`` to read the defaults).
    """
    import gradio as gr
    from modules.ui_components import InputAccordion

    tab = "img2img" if is_img2img else "txt2img"

    def eid(name: str) -> str:
        return f"loratorio_{tab}_{name}"

    def control(name: str):
        """The component of one setting, by its kind."""
        label, elem_id = LABELS[name], eid(name)
        if name in SLIDER_RANGES:
            minimum, maximum, step = SLIDER_RANGES[name]
            return gr.Slider(minimum, maximum, value=getattr(defaults, name), step=step, label=label, elem_id=elem_id)
        if name in LORA_LISTS:
            return gr.Dropdown(choices=names, value=[], multiselect=True, label=label, elem_id=elem_id)
        if name == "method":
            return gr.Radio(choices=list(METHODS), value=defaults.method, label=label, elem_id=elem_id)
        return gr.Checkbox(value=getattr(defaults, name), label=label, elem_id=elem_id)

    try:
        names = list(lora_names())
    except Exception:  # a broken LoRA folder must not take the UI down
        names = []
    components: dict = {}
    with InputAccordion(False, label=LABELS["enabled"], elem_id=f"loratorio_{tab}") as enabled:
        components["enabled"] = enabled
        known = gr.HTML(value=known_loras_html(tag_names(lora_names)), elem_id=eid("known_loras"),
                        elem_classes=["loratorio-known-loras"])
        for row in UI_ROWS:
            with gr.Row():
                components.update({name: control(name) for name in row})
                if row == LORA_LISTS:
                    _add_refresh_button([components[n] for n in row], known, refresh, lora_names, eid("refresh"))

    script.infotext_fields = paste_fields(components)
    script.paste_field_names = [INFOTEXT_KEYS[n] for n in UI_ORDER if n not in ("enabled", "pool", "merge_into_base")]
    return [components[name] for name in UI_ORDER]


def _add_refresh_button(dropdowns: list, known, refresh: Callable[[], None] | None,
                        lora_names: Callable[[], list[str]], elem_id: str) -> None:
    """The WebUI's refresh button for the LoRA lists: one rescan updates both dropdowns and the known names.

    Built as the WebUI's ``create_refresh_button`` builds its own, with the hidden list of
    known names as one more output (a second listener on that button could read the old
    list while the rescan is still running). Skipped without ``refresh`` or on a WebUI
    without these helpers: the dropdowns still work, just without refresh.
    """
    if refresh is None:
        return
    try:
        import gradio as gr
        from modules.ui_common import refresh_symbol
        from modules.ui_components import ToolButton
    except Exception:
        return

    def refreshed():
        refresh()
        choices = list(lora_names())
        known.value = known_loras_html(tag_names(lora_names))
        for dropdown in dropdowns:  # later page loads start from the new lists too
            dropdown.choices = choices
        return [*(gr.update(choices=choices) for _ in dropdowns), known.value]

    button = ToolButton(value=refresh_symbol, elem_id=elem_id, tooltip="Refresh the LoRA lists")
    button.click(fn=refreshed, inputs=[], outputs=[*dropdowns, known])


def paste_fields(components: Mapping) -> list[tuple]:
    """``(component, callable)`` pairs for pasting infotext back into the UI.

    The accordion turns off when the pasted text has no LoRAtorio entry. With the entry,
    every setting is set: the infotext leaves out settings at their defaults (and images
    from before the method setting were made by the paper's step), so a key the text
    does not have must reset the component rather than leave the current value.
    """
    fields: list[tuple] = [(components["enabled"], lambda d: Settings.from_infotext(d)["enabled"])]
    fields += [(components[name], _setting_getter(name)) for name in UI_ORDER[1:]]
    return fields


def _setting_getter(name: str):
    def get(params):
        if INFOTEXT_KEYS["enabled"] not in params:
            return None
        return Settings.from_infotext(params).get(name)

    return get


def register_xyz_axes(scripts_data) -> bool:
    """Add the LoRAtorio axes to the XYZ plot script (idempotent). False when XYZ is not loaded."""
    module = next((d.module for d in scripts_data if getattr(d.script_class, "__module__", "") == "xyz_grid.py"), None)
    if module is None:
        return False
    if any(getattr(o, "label", "").startswith(XYZ_PREFIX) for o in module.axis_options):
        return True

    def setter(name: str, convert):
        def apply(p, x, xs):
            overrides = dict(getattr(p, OVERRIDES_ATTR, None) or {})
            overrides[name] = convert(x)
            setattr(p, OVERRIDES_ATTR, overrides)

        return apply

    def to_bool(x):
        return x if isinstance(x, bool) else str(x).strip().lower() == "true"

    choice = module.boolean_choice(reverse=True) if hasattr(module, "boolean_choice") else None
    module.axis_options.extend([
        module.AxisOption(XYZ_PREFIX + "Enabled", str, setter("enabled", to_bool), choices=choice),
        module.AxisOption(XYZ_PREFIX + LABELS["recenter"], float, setter("recenter", float)),
        module.AxisOption(XYZ_PREFIX + LABELS["temperature_scale"], float, setter("temperature_scale", float)),
        module.AxisOption(XYZ_PREFIX + LABELS["patch_size"], int, setter("patch_size", int)),
        module.AxisOption(XYZ_PREFIX + "Top-k", int, setter("top_k", int)),
        module.AxisOption(XYZ_PREFIX + LABELS["method"], str, setter("method", str), choices=lambda: list(METHODS)),
    ])
    return True
