"""Per-row multi-LoRA routing: N LoRA branches in one model call, weights untouched.

Inside :meth:`Router.route`, every forward of a target module adds LoRA ``j``'s delta,
computed from input rows ``rows[j]``, to output rows ``rows[j]`` of that module. Rows no
adapter covers keep the base output bit for bit (the delta is added in place to the
covered rows only). The result for rows ``rows[j]`` equals a copy of the model with
LoRA ``j`` merged into its weights, up to float rounding.

The adapters of one module that share a form (low-rank linear, low-rank conv, Tucker,
dense, same output slice) run as one batched matmul or one grouped convolution, ranks
zero-padded to the largest (:mod:`loratorio.routing_stacks`), so the cost grows with the
adapters' FLOPs and not with Python calls per adapter.

Safety: weights are never written; the routed forward is set on each target module's
instance for the block's duration only and removed on exit, on any exception and on
KeyboardInterrupt (see :class:`_Override`), and a module cannot be routed twice at once
(nesting is an error, so is overlapping rows).
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn

from .lora import OutputSlice, pieces
from .routing_jobs import _Job, _linear_fast, _linear_shared, _members, _pointwise_fast, _SharedJob
from .routing_stacks import RoutingError, _build_groups, _ConvGeometry, _Group, _group_delta, _is_conv

__all__ = ["Router", "RoutingError", "attached", "routed"]

# ids of the modules being routed now (plain ints: entering a route keeps no objects alive that
# the garbage collector would have to track; a routed module is held by its router meanwhile)
_ACTIVE: set[int] = set()
_ACTIVE_LOCK = threading.Lock()


class _ModulePlan:
    """Everything needed to route one target module."""

    _SCHEDULES = 4  # cached schedules per module (row layouts x batch sizes x devices/dtypes)

    def __init__(self, name: str, module: nn.Module, entries, out_slice: tuple[int, int] | None):
        self.name, self.module = name, module
        self.conv = _is_conv(module)
        self.geometry = _ConvGeometry.of(module) if self.conv else None
        self.groups = _build_groups(name, entries, self.conv, self.geometry)
        # Output features this plan writes: all, or one sub-projection of a packed weight.
        self.features = slice(None) if out_slice is None else slice(out_slice[0], out_slice[0] + out_slice[1])
        self._schedules: dict[tuple, list[_Job]] = {}
        self._products: dict[tuple, torch.Tensor] = {}  # fused factor products, shared by the schedules
        # the schedule of the current route block and input kind (see apply)
        self._epoch, self._batch, self._dtype, self._device, self._jobs = -1, -1, None, None, []

    def jobs(self, spans_key: tuple, spans, batch: int, device, dtype) -> list[_Job]:
        """The schedule for this row layout, batch size, device and dtype, built once and kept.

        The cache is small and per module; it is emptied when the stacks move to another
        device or dtype (so it never holds tensors the router no longer counts).
        """
        key = (spans_key, batch, device, dtype)
        jobs = self._schedules.get(key)
        if jobs is None:
            if len(self._schedules) >= self._SCHEDULES:
                self._schedules.clear()
                self._products.clear()
            held = [(id(g.stacks), id(g.cache)) for g in self.groups]
            jobs = self.schedule(spans, batch, device, dtype)
            if held != [(id(g.stacks), id(g.cache)) for g in self.groups]:
                self._schedules.clear()  # the stacks moved: older schedules would keep the old copies alive
                self._products.clear()
            self._schedules[key] = jobs
        return jobs

    def schedule(self, spans: list[list[tuple[int, int | None]]], batch: int, device, dtype) -> list[_Job]:
        """The work of one forward for a given batch size: one :class:`_Job` per batched piece.

        Rows are resolved, equal adjacent spans merged into one batched job, the stacks of a
        subset of adapters selected, and the fused path of the form chosen here, so a
        forward only runs tensor ops.
        """
        jobs = []
        for group in self.groups:
            by_span: dict[tuple[int, int], list[int]] = {}
            for pos, j in enumerate(group.members):
                for start, stop in spans[j]:
                    stop = batch if stop is None else stop
                    if stop > batch or start >= stop:
                        raise RoutingError(f"rows {start}:{stop} of adapter {j} do not fit a batch of {batch} rows "
                                           f"at module {self.name!r}")
                    by_span.setdefault((start, stop), []).append(pos)
            if not by_span:
                continue
            stacks = group.tensors(device, dtype)
            # a span several adapters share (the merged row): all of them in one job there
            for (start, stop), positions in by_span.items():
                if len(positions) > 1:
                    jobs.append(self._shared_job(group, slice(start, stop), _members(stacks, positions, device)))
            active = sorted((start, stop, ps[0]) for (start, stop), ps in by_span.items() if len(ps) == 1)
            if not active:
                continue
            first, length = active[0][0], active[0][1] - active[0][0]
            if all(stop - start == length and start == first + i * length
                   for i, (start, stop, _pos) in enumerate(active)):
                positions = [pos for _, _, pos in active]
                selected = stacks if positions == list(range(len(group.members))) else _members(stacks, positions,
                                                                                                  device)
                jobs.append(self._job(group, slice(first, first + length * len(active)), len(active), selected,
                                      tuple(positions)))
                continue
            for start, stop, pos in active:  # uneven rows: one job per span
                jobs.append(self._job(group, slice(start, stop), 1, _members(stacks, [pos], device), (pos,)))
        return jobs

    def held_tensors(self) -> Iterator[torch.Tensor]:
        """Every tensor this plan keeps: the stacks, their device copies, and what cached schedules hold."""
        for group in self.groups:
            for tensors in (group.stacks, *group.cache.values()):
                yield from tensors.values()
        for jobs in self._schedules.values():
            for job in jobs:
                yield from job.stacks.values()
                yield from job.extra

    def _job(self, group: _Group, rows: slice, m: int, stacks: dict[str, torch.Tensor], positions: tuple) -> _Job:
        job = _Job(group, rows, m, stacks)
        if "b" in stacks or self.features != slice(None):
            return job
        if group.form == "lr_linear" and not self.conv:
            down_t = stacks["down_t"]
            key = (id(group), positions, down_t.device, down_t.dtype)
            job.fast, job.extra = _linear_fast(rows, m, down_t, stacks["up_t"], self._products, key)
        elif group.form == "lr_conv" and self._pointwise():
            job.fast, job.extra = _pointwise_fast(rows, m, stacks["down"], stacks["up"])
        return job

    def _shared_job(self, group: _Group, rows: slice, stacks: dict[str, torch.Tensor]) -> _Job:
        """Several adapters on the same rows: the sum of their deltas (as merged weights give).

        Low-rank linear: one fused path over the stacked factors (no copy kept); other
        forms: each adapter's delta in turn.
        """
        m = next(iter(stacks.values())).shape[0]
        job = _SharedJob(group, rows, m, stacks)
        if "b" not in stacks and self.features == slice(None) and group.form == "lr_linear" and not self.conv:
            job.fast = _linear_shared(rows, stacks["down_t"], stacks["up_t"])
        return job

    def _pointwise(self) -> bool:
        g = self.geometry
        return (self.conv and g is not None and g.kernel == (1, 1) and g.stride == (1, 1) and g.dilation == (1, 1)
                and not isinstance(g.padding, str) and tuple(g.padding) == (0, 0))

    def apply(self, x: torch.Tensor, out: torch.Tensor, session: _Session) -> None:
        """Add this plan's deltas for the current route block to ``out`` (the module's output for input ``x``).

        The schedule is looked up once per route block and kept while the inputs' batch
        size, device and dtype stay the same (every call of a step).
        """
        batch = x.shape[0]
        if (self._epoch != session.epoch or batch != self._batch or x.dtype != self._dtype
                or x.device != self._device):
            self._jobs = self.jobs(session.spans_key, session.spans, batch, x.device, x.dtype)
            self._epoch, self._batch, self._dtype, self._device = session.epoch, batch, x.dtype, x.device
        self.run(x, out, self._jobs)

    def run(self, x: torch.Tensor, out: torch.Tensor, jobs: list[_Job]) -> None:
        """Add the deltas of ``jobs`` to ``out`` in place; rows outside the jobs are not touched."""
        for job in jobs:
            if job.fast is not None and job.fast(x, out):
                continue
            if isinstance(job, _SharedJob):
                xr = x[job.rows]
                for i in range(job.m):  # each adapter's delta on the same rows
                    one = {k: v[i:i + 1] for k, v in job.stacks.items()}
                    self._add(out, job.rows, _group_delta(job.group, one, xr, 1, self.geometry))
                continue
            self._add(out, job.rows, _group_delta(job.group, job.stacks, x[job.rows], job.m, self.geometry))

    def _add(self, out: torch.Tensor, rows: slice, delta: torch.Tensor) -> None:
        target = out[rows]
        target = target[:, self.features] if self.conv else target[..., self.features]
        if target.shape != delta.shape:
            raise RoutingError(f"module {self.name!r}: adapter output {list(delta.shape)} does not match the module "
                               f"output {list(target.shape)}")
        target.add_(delta.to(out.dtype))


class Router:
    """Adapters of N LoRAs prepared once for a set of target modules.

    ``targets`` maps module names to modules (Linear-like or Conv2d-like; they need not
    subclass the torch classes). ``adapters`` holds one adapter set per LoRA
    (``name -> piece | list[piece]``, see :mod:`loratorio.lora`); every name must be a
    target. Weights are stacked per module and form once here, and copied to the
    compute device/dtype at first use; :attr:`nbytes` tells what is held.
    """

    def __init__(self, targets: Mapping[str, nn.Module], adapters: Sequence[Mapping]):
        self.num_adapters = len(adapters)
        per_module: dict[str, list] = {}
        for j, adapter_set in enumerate(adapters):
            for name, entry in adapter_set.items():
                if name not in targets:
                    raise RoutingError(f"adapter {j} names module {name!r}, which is not among the targets")
                for piece in pieces(entry):
                    out_slice = None
                    if isinstance(piece, OutputSlice):
                        out_slice, piece = (piece.offset, piece.size), piece.inner
                    per_module.setdefault(name, []).append((j, piece, out_slice))
        self._plans: list[_ModulePlan] = []
        self._modules: list[nn.Module] | None = None
        self._session = _Session()
        self._overrides: list[_Override] | None = None  # made at the first route, reused by later ones
        for name, entries in per_module.items():
            # One plan per output slice keeps the add-in-place target a plain view.
            slices = sorted({e[2] for e in entries}, key=lambda s: (s is not None, s))
            for out_slice in slices:
                self._plans.append(_ModulePlan(name, targets[name], [e for e in entries if e[2] == out_slice],
                                               out_slice))

    @property
    def nbytes(self) -> int:
        """Bytes of the stacked adapter tensors and their device copies."""
        seen: set[int] = set()
        total = 0
        for plan in self._plans:
            for tensor in plan.held_tensors():
                ptr = tensor.untyped_storage().data_ptr()
                if ptr not in seen:
                    seen.add(ptr)
                    total += tensor.untyped_storage().nbytes()
        return total

    @property
    def modules(self) -> list[nn.Module]:
        if self._modules is None:
            self._modules = [module for module, _plans in self._by_module()]
        return self._modules

    def _spans(self, rows: Sequence) -> list[list[tuple[int, int | None]]]:
        """Normalise ``rows`` to a list of ``(start, stop)`` spans per adapter.

        Several adapters may name the very same span: they act together on those rows (each
        adds its change to the module's output, as merged weights would). Any other overlap
        is an error.
        """
        if len(rows) != self.num_adapters:
            raise RoutingError(f"rows has {len(rows)} entries for {self.num_adapters} adapters")
        spans = []
        for j, entry in enumerate(rows):
            items = [] if entry is None else [entry] if isinstance(entry, slice) else list(entry)
            own = []
            for r in items:
                if not isinstance(r, slice) or r.step not in (None, 1):
                    raise RoutingError(f"rows[{j}] must be a slice with step 1, a list of such slices, or None; "
                                       f"got {r!r}")
                start = 0 if r.start is None else r.start
                if start < 0 or (r.stop is not None and r.stop <= start):
                    raise RoutingError(f"rows[{j}] = {r!r} must be a non-empty slice with non-negative bounds")
                own.append((start, r.stop))
            spans.append(own)
        for j, own in enumerate(spans):
            if len(set(own)) != len(own):
                raise RoutingError(f"rows[{j}] names the same rows twice")
        ordered = sorted({s for own in spans for s in own}, key=lambda s: (s[0], -1 if s[1] is None else s[1]))
        for (a0, a1), (b0, _b1) in itertools.pairwise(ordered):
            if a1 is None or a1 > b0:
                raise RoutingError(f"rows overlap: {a0}:{a1} and {b0}:...; rows are either one adapter's or the "
                                   "same span for several")
        return spans

    @contextlib.contextmanager
    def route(self, rows: Sequence, errors: list | None = None) -> Iterator[None]:
        """Route adapter ``j`` onto batch rows ``rows[j]`` for the block's duration.

        ``rows[j]`` is a slice, a list of slices (the same adapter on several row blocks,
        e.g. one per AND sub-prompt), or ``None`` (not in this call). The work of each
        module for a row layout and batch size is planned at its first forward and kept
        for later calls with the same layout.

        ``errors``: when a list, an exception raised while routing a module is appended to
        it instead of propagating, and no module is routed after it (the rows no adapter
        covers are never written, so the call's other rows stay exact). For a caller that
        routes inside a model call it does not own and reports the error after that call.
        """
        spans = self._spans(rows)
        session = self._session
        if self._overrides is None:
            self._overrides = [_Override(module, plans, session) for module, plans in self._by_module()]
        ids = [id(o.module) for o in self._overrides]
        with _ACTIVE_LOCK:
            if any(i in _ACTIVE for i in ids):
                raise RoutingError("a target module is already being routed; nested or concurrent routing "
                                   "of the same model is not allowed")
            _ACTIVE.update(ids)
        session.epoch += 1
        session.spans, session.spans_key, session.errors = spans, tuple(tuple(s) for s in spans), errors
        installed = 0
        try:
            for override in self._overrides:
                override.install()
                installed += 1
            yield
        finally:
            for override in reversed(self._overrides[:installed]):
                override.remove()
            session.spans, session.spans_key, session.errors = None, None, None
            with _ACTIVE_LOCK:
                _ACTIVE.difference_update(ids)

    def _by_module(self) -> list[tuple[nn.Module, list[_ModulePlan]]]:
        """The plans of each target module (several where LoRAs write different output slices)."""
        grouped: dict[int, tuple[nn.Module, list[_ModulePlan]]] = {}
        for plan in self._plans:
            grouped.setdefault(id(plan.module), (plan.module, []))[1].append(plan)
        return list(grouped.values())


class _Session:
    """The current route block of a router: its rows and error list, read by its routed forwards."""

    __slots__ = ("epoch", "errors", "spans", "spans_key")

    def __init__(self):
        self.epoch, self.errors, self.spans, self.spans_key = 0, None, None, None


class _Override:
    """A module's routed forward, set on the instance for each :meth:`Router.route` block.

    The routed forward is set as ``module.__dict__["forward"]``, which ``nn.Module.__call__``
    reads before the class's; the class's forward (or a forward another extension set on
    the instance before) runs unchanged, then each plan adds its deltas to the output rows
    in place. Against a forward hook this skips the hook path of ``nn.Module.__call__``,
    and the deltas join the layer's own output before any hook of another extension sees
    it, as merged weights would.

    The override is made once per router and module and only switched on and off per
    block: entering a route keeps no new objects alive (a hook per module made a handle
    and closures at every step, all of them for the garbage collector to track).

    :meth:`remove` restores what was there. If something else replaced the instance's
    forward on top of ours meanwhile, ours cannot be unlinked from its chain: it stays
    switched off (passing through) and a fresh one is made for later blocks.
    """

    __slots__ = ("_state", "forward", "module")

    def __init__(self, module: nn.Module, plans: list[_ModulePlan], session: _Session):
        self.module = module
        self._renew(plans, session)

    def _renew(self, plans: list[_ModulePlan], session: _Session) -> None:
        """A new routed forward with its own state (switched off until :meth:`install`)."""
        self._state = _OverrideState(self.module, plans, session)
        self.forward = _routed_forward(self._state)

    def install(self) -> None:
        state = self._state
        state.previous = self.module.__dict__.get("forward")
        state.class_forward = type(self.module).forward
        state.live = True
        self.module.__dict__["forward"] = self.forward

    def remove(self) -> None:
        state = self._state
        state.live = False
        attrs = self.module.__dict__
        if attrs.get("forward") is self.forward:
            if state.previous is None:
                del attrs["forward"]
            else:
                attrs["forward"] = state.previous
            state.previous = None
            return
        # wrapped by someone else meanwhile: leave this one off in their chain, use a new one next time
        self._renew(state.plans, state.session)


class _OverrideState:
    """What a routed forward reads at each call: whether it is on, and the forward it wraps."""

    __slots__ = ("class_forward", "live", "module", "name", "plans", "previous", "session")

    def __init__(self, module: nn.Module, plans: list[_ModulePlan], session: _Session):
        self.module, self.plans, self.session, self.name = module, plans, session, plans[0].name
        self.live, self.previous, self.class_forward = False, None, None


def _routed_forward(state: _OverrideState):
    """The forward of a routed module: its own forward, then each plan's deltas added to the output (in place)."""
    module, plans, session = state.module, state.plans, state.session

    def add(args: tuple, kwargs: dict, out) -> None:
        if not isinstance(out, torch.Tensor):
            raise RoutingError(f"module {state.name!r} returned {type(out).__name__}, not a tensor")
        x = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
        for plan in plans:
            plan.apply(x, out, session)

    def forward(*args, **kwargs):
        previous = state.previous
        out = previous(*args, **kwargs) if previous is not None else state.class_forward(module, *args, **kwargs)
        if state.live:
            errors = session.errors
            if errors is None:
                add(args, kwargs, out)
            elif not errors:  # after a module failed, the rest of the call stays the model's own
                try:
                    add(args, kwargs, out)
                except Exception as exc:
                    errors.append(exc)
        return out

    return forward


def attached(module: nn.Module) -> bool:
    """Whether routing (or anything else) has set a forward on this module's instance."""
    return "forward" in module.__dict__


def routed(targets: Mapping[str, nn.Module], adapters: Sequence[Mapping], rows: Sequence):
    """Context manager: route ``adapters[j]`` onto ``rows[j]`` of every forward of ``targets`` (see :class:`Router`)."""
    return Router(targets, adapters).route(rows)
