"""LoRA files to branches: planning from tags and settings, loading through the host, caching.

Host-free. A host adapter supplies a :class:`HostBridge` (how its WebUI finds and loads a
LoRA file, and which modules adapters may target); everything here decides which LoRAs
become branches of a generation, loads each file once into the bounded
:class:`AdapterCache`, and applies the tag's multipliers and ``dyn`` rank. Every reason a
LoRA is not composed is a :class:`Reason` text, shown to the user as it is.

What a host's bridge supplies (created per generation):

- ``model_key()``: a hashable identity of the loaded model; a change drops the cache;
- ``find_lora(name) -> LoraFile | None``: resolve a tag name as the host's LoRA list does;
- ``available_loras() -> list[str]``: names for the pool / merge dropdowns;
- ``load_lora(lora_file) -> LoadedLora``: the file's adapters at multiplier 1 (UNet and
  text encoder, keyed by the names of ``unet_targets`` / ``te_targets``; pieces for
  packed parameters that hooks cannot reach go to ``te_merge``); raise on failure;
- ``unet_targets()`` / ``te_targets()``: module name -> module that adapters may use;
- ``default_multiplier``: the multiplier of pool LoRAs (they have no tag).
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field

import torch

from .lora import all_finite, pieces, scaled_set, truncate_rank
from .settings import Settings
from .tags import TagParse, parse_lora_tags

__all__ = ["AdapterCache", "Branch", "BranchPlan", "BranchSpec", "HostBridge", "LoadedLora", "LoraFile",
           "LoraLoadError", "Reason", "load_branches", "plan_branches"]


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
        return all_finite(self.unet, self.te, self.te_merge)


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
