"""AUTOMATIC1111 WebUI adapter (1.6 - 1.10).

How LoRAtorio runs inside A1111:

- **Branches** come from the ``<lora:...>`` tags of the batch's first prompt (and the
  candidate pool); the built-in Lora extension loads them (``networks.load_network``)
  and this module turns its modules into adapters: LoRA/LoCon factors as
  :class:`~loratorio.lora.LowRank`, every other type as the full delta its own
  ``calc_updown`` computes (:class:`~loratorio.lora.Dense`).
- **The built-in stays off the composed tags**: in ``after_extra_networks_activate`` the
  composed networks are removed from ``networks.loaded_networks`` and from the
  extra-network data of the processing object (which is part of the conditioning cache
  key), so the infotext keeps "Lora hashes" and nothing is merged.
- **Per-branch text encoder**: each branch's conditioning is computed through the
  WebUI's prompt parser with that LoRA's text-encoder adapters routed onto every row
  (packed attention projections merged for the duration of the call and restored bit
  for bit), so prompt editing, AND, BREAK, emphasis and SDXL's two encoders apply.
- **Each step** (``on_cfg_denoiser`` / ``on_cfg_denoised``): the branch rows join the
  denoiser's own batch, between its cond and its uncond rows, so A1111's one model call
  evaluates the base rows (unrouted, unchanged) and every branch row (routed to its LoRA
  by hooks that exist only during that call). Where A1111 itself calls the model in
  pieces (``batch_cond_uncond`` off, prompt and negative prompt of different token
  lengths) or the max-rows setting caps a call, the base rows run as A1111 runs them and
  one extra routed call evaluates the branch rows (chunked by the max-rows setting). The
  :class:`~loratorio.engine.Composer` fuses them (method steps 1-8), and the fused cond
  rows and re-centred uncond rows are written back into the denoiser's output in place;
  A1111's own CFG combines them.
  k-diffusion samplers give *denoised* predictions (fused with ``x``), DDIM/PLMS/UniPC
  give *noise* predictions.

Exceptions inside these hooks stop the generation through the WebUI's interrupt (a
script hook's exception alone would not stop it), with the cause in the console, the
comments and the infotext; routing hooks and temporary merges never outlive one call.
"""

from __future__ import annotations

import contextlib
import logging
import math
import weakref
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from . import host_common as hc
from .host_common import GenerationState, get_state
from .lora import Dense, LowRank, OutputSlice, delta_weight

__all__ = ["CACHE", "A1111Bridge", "convert_network"]

log = logging.getLogger("loratorio")

CACHE = hc.AdapterCache(hc.CACHE_DEFAULT_MB)

# The generation in progress, for 1.6/1.7 callbacks whose params carry no denoiser.
# Only a weak pointer: all of a generation's data lives on its processing object.
_current: dict[str, weakref.ref | None] = {"p": None}

_PACKED_SUFFIXES = ("_q_proj", "_k_proj", "_v_proj")
# Parts of a layer's key (after its first dot) in the files the built-in loader reads: LoRA/LoCon,
# PEFT, LoHa, LoKr, IA3, OFT, full and norm differences.
_LORA_PART_PREFIXES = ("lora_up.", "lora_down.", "lora_mid.", "lora_A.", "lora_B.", "hada_", "lokr_", "oft_")
_LORA_PART_NAMES = frozenset({"on_input", "weight", "bias", "diff", "diff_b", "w_norm", "b_norm", "alpha",
                              "dora_scale"})


def _networks():
    import networks  # the built-in Lora extension's module, importable once it has loaded

    return networks


def _shared():
    from modules import shared

    return shared


# -- LoRA files through the built-in loader ----------------------------------------------------


def _is_routable(module) -> bool:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() not in (2, 4):
        return False
    return not isinstance(module, (nn.GroupNorm, nn.LayerNorm, nn.Embedding))


def _layer_name(module, key: str) -> str:
    return getattr(module, "network_layer_name", None) or key


def convert_network(net, mapping: Mapping[str, nn.Module]) -> hc.LoadedLora:
    """Adapters (multiplier 1) from a built-in ``network.Network``.

    LoRA/LoCon modules give their factors and ``calc_scale()``; other module types (and
    DoRA) give the delta of their own ``calc_updown`` with the multipliers set to 1.
    Text-encoder layers are the ones the built-in treats so (``'transformer'`` in the
    first 20 characters of the layer key). The q/k/v parts of a ``MultiheadAttention``
    and its ``out_proj`` are used as weights, not called as modules, so they go to
    ``te_merge`` (merged around the text-encoder pass only).
    """
    loaded = hc.LoadedLora()
    saved = (net.te_multiplier, net.unet_multiplier, getattr(net, "dyn_dim", None))
    net.te_multiplier = net.unet_multiplier = 1.0
    net.dyn_dim = None
    try:
        for key, module in net.modules.items():
            target = module.sd_module
            is_te = "transformer" in str(getattr(module, "sd_key", key))[:20]
            loaded.kinds.add(type(module).__name__)
            kind, name, piece = _convert_module(key, module, target, mapping)
            if piece is None:
                loaded.unmatched += 1
                continue
            bucket = {"merge": loaded.te_merge, "route": loaded.te if is_te else loaded.unet}[kind]
            if kind == "merge" and not is_te:
                loaded.unmatched += 1  # packed attention only exists in the text encoders of SD models
                continue
            bucket.setdefault(name, []).append(piece)
    finally:
        net.te_multiplier, net.unet_multiplier, net.dyn_dim = saved
    for bucket in (loaded.unet, loaded.te, loaded.te_merge):
        for name, items in bucket.items():
            if len(items) == 1:
                bucket[name] = items[0]
    return loaded


def _factor(layer) -> torch.Tensor | None:
    return None if layer is None else layer.weight.detach()


def _convert_module(key: str, module, target, mapping):
    """``(kind, target name, piece)``; kind "route" (output hook) or "merge" (packed weight)."""
    if isinstance(target, nn.MultiheadAttention):
        suffix = next((s for s in _PACKED_SUFFIXES if key.endswith(s)), None)
        if suffix is None:
            return "merge", key, None
        index = _PACKED_SUFFIXES.index(suffix)
        size = target.embed_dim
        inner = _lowrank_or_dense(module, target.in_proj_weight, size)
        name = _layer_name(target, key[: -len(suffix)])
        return "merge", name, None if inner is None else OutputSlice(inner, index * size, size)
    if not _is_routable(target):
        return "route", key, None
    name = _layer_name(target, key)
    parent = mapping.get(name[: -len("_out_proj")]) if name.endswith("_out_proj") else None
    piece = _lowrank_or_dense(module, target.weight, None)
    if isinstance(parent, nn.MultiheadAttention):
        return "merge", name, piece
    return "route", name, piece


def _lowrank_or_dense(module, weight: torch.Tensor, rows: int | None):
    up, down = _factor(getattr(module, "up_model", None)), _factor(getattr(module, "down_model", None))
    if up is not None and down is not None and getattr(module, "dora_scale", None) is None:
        mid = _factor(getattr(module, "mid_model", None))
        if weight.dim() == 2:
            down, up = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)
        return LowRank(down, up, float(module.calc_scale()), mid)
    with torch.no_grad():
        delta, bias = module.calc_updown(weight)
    delta = delta.detach().to("cpu")
    delta = delta.reshape(rows, *weight.shape[1:]) if rows is not None else delta.reshape(weight.shape)
    return Dense(delta, 1.0, None if bias is None else bias.detach().to("cpu").reshape(-1))


class A1111Bridge(hc.HostBridge):
    """The built-in Lora extension's file list and loader, and the model's layer names."""

    def __init__(self):
        shared = _shared()
        self.networks = _networks()
        self.model = shared.sd_model
        self.default_multiplier = float(getattr(shared.opts, "extra_networks_default_multiplier", 1.0) or 1.0)
        self._mapping = None

    def model_key(self):
        info = getattr(self.model, "sd_checkpoint_info", None)
        return (id(self.model), getattr(info, "filename", None), getattr(self.model, "sd_model_hash", None))

    def mapping(self) -> Mapping[str, nn.Module]:
        if self._mapping is None:
            mapping = getattr(self.model, "network_layer_mapping", None)
            if not mapping:
                self.networks.assign_network_names_to_compvis_modules(self.model)
                mapping = self.model.network_layer_mapping
            self._mapping = mapping
        return self._mapping

    def _on_disk(self, name: str):
        nets = self.networks

        def look():
            if name.lower() in getattr(nets, "forbidden_network_aliases", {}):
                return nets.available_networks.get(name)
            return nets.available_network_aliases.get(name)

        found = look()
        if found is None and hasattr(nets, "update_available_networks_by_names"):
            nets.update_available_networks_by_names([name])
            found = look()
        return found

    def find_lora(self, name: str) -> hc.LoraFile | None:
        on_disk = self._on_disk(name)
        if on_disk is None or not getattr(on_disk, "filename", None):
            return None
        return hc.LoraFile.at(name, on_disk.filename)

    def available_loras(self) -> list[str]:
        return sorted(self.networks.available_networks)

    def load_lora(self, lora_file: hc.LoraFile) -> hc.LoadedLora:
        on_disk = self._on_disk(lora_file.name)
        if on_disk is None:
            raise hc.LoraLoadError("not found")
        layers = _file_layers(on_disk.filename)
        net = self.networks.load_network(lora_file.name, on_disk)
        if net is None:
            raise hc.LoraLoadError("the Lora extension returned nothing")
        loaded = convert_network(net, self.mapping())
        if layers is not None:
            # the built-in loader drops the layers it cannot map before they reach convert_network
            loaded.layers = layers
            loaded.unmatched += max(0, layers - len(net.modules))
        return loaded

    def _targets(self, unet: bool) -> dict[str, nn.Module]:
        return {k: m for k, m in self.mapping().items() if k.startswith("diffusion_model_") == unet}

    def unet_targets(self):
        return self._targets(True)

    def te_targets(self):
        return self._targets(False)


def _file_layers(filename: str) -> int | None:
    """LoRA layers a safetensors file holds, as the built-in loader groups its keys (text before the first dot).

    Reads the header only. None for other file types. Raises :class:`LoraLoadError`
    for a file with tensors but no LoRA-type key (a checkpoint or VAE in the LoRA folder).
    """
    if not str(filename).lower().endswith(".safetensors"):
        return None
    try:
        from safetensors import safe_open

        with safe_open(filename, framework="pt") as f:
            keys = list(f.keys())
    except Exception:  # unreadable here: the built-in loader's own error says why
        return None
    keys = [k for k in keys if not k.startswith("bundle_emb.")]  # embeddings bundled with the LoRA
    layers = {k.partition(".")[0] for k in keys if _is_lora_part(k.partition(".")[2])}
    if keys and not layers:
        raise hc.LoraLoadError(hc.Reason.not_a_lora(len(keys)))
    return len(layers)


def _is_lora_part(part: str) -> bool:
    return part in _LORA_PART_NAMES or part.startswith(_LORA_PART_PREFIXES)


def lora_names() -> list[str]:
    try:
        return sorted(_networks().available_networks)
    except Exception:
        return []


def refresh_loras() -> None:
    _networks().list_available_networks()


# -- per-branch text conditioning -------------------------------------------------------------


def _settle_builtin(module) -> None:
    """Let the built-in Lora finish its own merge of ``module`` before a temporary merge.

    Its merge is lazy and restores from its own backup when the wanted set changes; a
    pending merge running inside our temporary one would make our restore wrong.
    """
    apply = getattr(_networks(), "network_apply_weights", None)
    if apply is not None and getattr(module, "network_layer_name", None):
        apply(module)


@contextlib.contextmanager
def _text_encoder_branch(branch: hc.Branch, targets: Mapping[str, nn.Module]):
    """Route one branch's text-encoder adapters onto every row; merge packed ones meanwhile."""
    from .routing import Router

    saved: list[tuple[torch.Tensor, torch.Tensor]] = []
    try:
        for name, entry in branch.te_merge.items():
            module = targets[name]
            owner = module
            if name.endswith("_out_proj"):
                owner = targets.get(name[: -len("_out_proj")], module)
            _settle_builtin(owner)
            param = module.in_proj_weight if isinstance(module, nn.MultiheadAttention) else module.weight
            delta = delta_weight(entry, param.shape).to(param.device, param.dtype)
            saved.append((param, param.detach().clone()))
            with torch.no_grad():
                param.add_(delta)
        if branch.te:
            with Router(targets, [branch.te]).route([slice(0, None)]):
                yield
        else:
            yield
    finally:
        with torch.no_grad():
            for param, original in reversed(saved):
                param.copy_(original)


@dataclass
class _PassConds:
    """Branch conditionings of one sampling pass (None: the branch uses the base conds)."""

    pass_id: str
    cond: list  # per branch: MulticondLearnedConditioning | None
    uncond: list  # per branch: list of schedules | None


def _branch_conds(state: GenerationState, bridge: A1111Bridge, prompts, negative_prompts, width, height,
                  steps, hires_steps, pass_id) -> _PassConds:
    from modules import devices, prompt_parser

    shared = _shared()
    use_old = bool(getattr(shared.opts, "use_old_scheduling", False))
    c_all, uc_all = [], []
    te_targets = bridge.te_targets()
    for branch in state.branches:
        if not state.settings.text_encoder_per_branch or not (branch.te or branch.te_merge):
            c_all.append(None)
            uc_all.append(None)
            continue
        pos = prompt_parser.SdConditioning(list(prompts), width=width, height=height)
        neg = prompt_parser.SdConditioning(list(negative_prompts), width=width, height=height, is_negative_prompt=True)
        with torch.no_grad(), devices.autocast(), _text_encoder_branch(branch, te_targets):
            c = prompt_parser.get_multicond_learned_conditioning(shared.sd_model, pos, steps, hires_steps, use_old)
            uc = None
            if state.settings.recenter > 0:
                uc = prompt_parser.get_learned_conditioning(shared.sd_model, neg, steps, hires_steps, use_old)
        c_all.append(c)
        uc_all.append(uc)
    return _PassConds(pass_id, c_all, uc_all)


def _first_pass_conds(p, state, bridge) -> _PassConds:
    from modules import sd_samplers

    config = sd_samplers.find_sampler_config(p.sampler_name)
    total = config.total_steps(p.steps) if config else p.steps
    return _branch_conds(state, bridge, p.prompts, p.negative_prompts, p.width, p.height, total, None, "first")


def _hires_conds(p, state, bridge) -> _PassConds:
    from modules import sd_samplers

    config = sd_samplers.find_sampler_config(getattr(p, "hr_sampler_name", None) or p.sampler_name)
    steps = getattr(p, "hr_second_pass_steps", 0) or p.steps
    total = config.total_steps(steps) if config else steps
    first = getattr(p, "firstpass_steps", None) or p.steps
    return _branch_conds(state, bridge, p.hr_prompts, p.hr_negative_prompts, p.hr_upscale_to_x, p.hr_upscale_to_y,
                         first, total, "hr")


# -- generation lifecycle (called by the script) ------------------------------------------------



def _fail(p, state: GenerationState | None, exc: BaseException, where: str) -> None:
    """An error inside our hooks: stop the generation cleanly and say why."""
    hc.stop_generation(p, state, exc, where, release=_release_step)


def _release_step(p, state: GenerationState) -> None:
    """Take away the hooks a prepared step left on the UNet (its model call did not come)."""
    _drop_pending(state)
    _close_watches()


@contextlib.contextmanager
def _guarded(p, where: str):
    try:
        yield
    except Exception as exc:
        _fail(p, get_state(p), exc, where)


def _refusal(p) -> str | None:
    shared = _shared()
    model = shared.sd_model
    if getattr(p, "refiner_checkpoint_info", None) is not None:
        return hc.Reason.REFINER
    if getattr(model, "cond_stage_key", None) == "edit":
        return "InstructPix2Pix-style edit models are not supported"
    if getattr(getattr(model, "model", None), "conditioning_key", None) == "crossattn-adm":
        return "unCLIP models are not supported"
    if hasattr(model, "forge_objects"):
        return "this is Forge; the A1111 adapter cannot run here"
    return None


def process(p, *args) -> None:
    _current["p"] = None  # a new job: never follow an older one's state
    _close_watches()  # nor keep anything an older job's failed step left on the UNet
    state = hc.start_generation(p, args, _shared().opts, CACHE, guarded=_guarded, refusal=_refusal)
    if state is not None:
        _current["p"] = weakref.ref(p)


def before_process_batch(p, *args, prompts=None, **kwargs) -> None:
    state = get_state(p)
    if not hc.usable(state):
        return
    state.composer = None
    with _guarded(p, "loading LoRAs"):
        bridge = A1111Bridge()
        prompt = (prompts or p.prompts or [""])[0]
        if state.load(prompt, bridge, CACHE) or state.router is None:
            state.router = None
            if state.branches:
                from .routing import Router

                state.router = Router(bridge.unet_targets(), [b.unet for b in state.branches])
        state.extra["bridge"] = bridge
        state.extra.pop("conds", None)
        p.extra_generation_params.update(state.infotext())
        report = state.report()
        if report and (state.skipped or state.partial):
            print(report)


def after_extra_networks_activate(p, *args, extra_network_data=None, **kwargs) -> None:
    """Take the composed LoRAs away from the built-in before it merges anything (it merges lazily)."""
    state = get_state(p)
    if not hc.usable(state) or not state.branches:
        return
    with _guarded(p, "keeping the built-in Lora off the composed LoRAs"):
        names = state.handled_names
        nets = _networks()
        nets.loaded_networks[:] = [n for n in nets.loaded_networks
                                   if (getattr(n, "mentioned_name", None) or n.name) not in names]
        hc.set_lora_hashes(p, state, nets, _shared().opts)
        if extra_network_data is not None:
            for key in ("lora", "lyco"):
                entries = extra_network_data.get(key)
                if not entries:
                    continue
                entries[:] = [e for e in entries if not (e.items and e.items[0] in names)]
                if not entries:
                    del extra_network_data[key]


def process_batch(p, *args, **kwargs) -> None:
    state = get_state(p)
    if not hc.usable(state) or not state.branches:
        return
    with _guarded(p, "text encoder"):
        bridge = state.extra.get("bridge") or A1111Bridge()
        state.extra["conds"] = _first_pass_conds(p, state, bridge)
        state.extra["pass"] = "first"
        state.extra["model_id"] = id(_shared().sd_model)
        state.new_composer()



def postprocess_batch(p, *args, **kwargs) -> None:
    state = get_state(p)
    if state is None:
        return
    with _guarded(p, "recording the composition map"):
        state.record_map(state.extra.get("map_rows"))
        state.count_dropped()
        p.extra_generation_params.update(state.infotext())


def postprocess(p, processed, *args) -> None:
    state = get_state(p)
    if state is None:
        return
    step = "writing the report"
    try:
        hc.show_report(p, processed, state)
        if state.maps and state.error is None:
            step = "adding the composition map"
            hc.append_maps(state, processed)
    except Exception as exc:  # the images are made; a failure here must not lose them
        hc.report_after_images(p, processed, exc, step)
    finally:
        state.close()
        state.extra.pop("images", None)
        current = _current["p"]
        if current is not None and current() is p:
            _current["p"] = None



# -- the per-step hook ---------------------------------------------------------------------------


@dataclass
class _Folded:
    """The branch rows a step added to the host's own model call (the one-call layout).

    The denoiser's batch becomes ``[base cond rows | branch blocks | base uncond rows]``:
    branch ``active[k]`` owns one block of its cond rows (the cond rows' latents with its
    own text) followed, when re-centring needs them, by its uncond rows (the uncond rows'
    latents with its own negative text). The uncond rows stay last, where the host's CFG
    and its skip-uncond cut expect them; its text batch is ``text_cond`` followed by the
    branch texts, so the host concatenates cond and uncond texts in the same order.
    """

    active: list[int]
    n_cond: int
    n_uncond: int
    block_rows: list[tuple[int, str, int]]  # (branch, "cond"/"uncond", rows) in batch order
    rows: list  # routing rows of the whole call, per branch
    watch: _CallWatch | None = None

    @property
    def n_branch(self) -> int:
        return sum(n for _, _, n in self.block_rows)


class _CallWatch:
    """Routes the branch rows of the host's next UNet call, and only that call.

    The UNet's ``forward`` is wrapped for one call (an instance attribute, set when the
    step is prepared and taken away as that call starts): inside it the branch rows are
    routed in a ``with`` block, so the routing hooks exist only while the call runs and
    leave on any exception, KeyboardInterrupt included. A call of another size is not the
    one this step prepared and runs unrouted. ``rows_seen`` is the batch the UNet got (the
    host drops the uncond rows on skip-uncond steps); ``errors`` collects an error of the
    routing itself, which the step reports after the call (the host's rows stay exact).
    ``on_error`` is told of any other exception of the call before it propagates.
    """

    def __init__(self, router, unet: nn.Module, rows: list, expected: tuple[int, ...], on_error=None):
        self.router, self.unet, self.rows, self.expected = router, unet, rows, expected
        self.on_error = on_error
        self.rows_seen: int | None = None
        self.errors: list = []
        self.closed = False
        self._had = "forward" in unet.__dict__
        self._previous = unet.__dict__.get("forward")
        inner = unet.forward

        def forward(*args, **kwargs):
            if self.closed:
                return inner(*args, **kwargs)
            self.close()
            x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            rows = int(x.shape[0]) if isinstance(x, torch.Tensor) else -1
            if rows not in self.expected:
                return inner(*args, **kwargs)  # not the call this step prepared (``_run_step`` then says so)
            self.rows_seen = rows
            try:
                route = self.router.route(self.rows, errors=self.errors)
                route.__enter__()
            except Exception as exc:  # reported after the call, which runs unrouted
                self.errors.append(exc)
                return inner(*args, **kwargs)
            try:
                return inner(*args, **kwargs)
            except Exception as exc:
                if self.on_error is not None:
                    self.on_error(exc)
                raise
            finally:
                route.__exit__(None, None, None)

        self._forward = forward
        unet.forward = forward
        _WATCHES.add(self)

    def close(self) -> None:
        """Take the wrapper away (unless another wrapper went on top since); idempotent."""
        if self.closed:
            return
        self.closed = True
        _WATCHES.discard(self)
        if self.unet.__dict__.get("forward") is self._forward:
            if self._had:
                self.unet.forward = self._previous
            else:
                del self.unet.forward


_WATCHES: weakref.WeakSet = weakref.WeakSet()


def _close_watches() -> None:
    """Take away every prepared step's hooks (a new job, a model change: nothing may carry over)."""
    for watch in list(_WATCHES):
        watch.close()


@dataclass
class _StepInput:
    x: torch.Tensor
    sigma: torch.Tensor
    image_cond: torch.Tensor
    text_cond: object
    text_uncond: object
    denoiser: object
    eval_index: int
    inner_model: object = None  # the model the denoiser calls; identifies the step in ``on_cfg_denoised``
    folded: _Folded | None = None  # set when the branch rows ride in the host's own call

    def matches(self, params) -> bool:
        """Whether ``params`` (CFGDenoisedParams) are the outcome of this prepared step.

        A step prepared by a job whose own model call then failed stays behind; the
        next call's output must never be fused with it.
        """
        inner = getattr(params, "inner_model", None)
        if self.inner_model is not None and inner is not None and inner is not self.inner_model:
            return False
        x_out = getattr(params, "x", None)
        # a different batch size is a layout error that ``_run_step`` reports; other sizes mean another job
        return isinstance(x_out, torch.Tensor) and x_out.shape[1:] == self.x.shape[1:]

    def release(self) -> None:
        if self.folded is not None and self.folded.watch is not None:
            self.folded.watch.close()


def _p_of(params):
    denoiser = getattr(params, "denoiser", None)
    p = getattr(denoiser, "p", None)
    if p is not None:
        ref = _current["p"]
        if ref is None or ref() is not p:
            # the denoiser names the generation in progress: a pointer to another one is stale
            # (a job that failed before postprocess, or a runner that never called process())
            _current["p"] = weakref.ref(p)
        return p, denoiser
    ref = _current["p"]
    p = ref() if ref is not None else None
    if p is None:
        return None, None
    sampler = getattr(p, "sampler", None)
    return p, getattr(sampler, "model_wrap_cfg", None)


def _drop_pending(state) -> None:
    pending = state.extra.pop("pending", None)
    if pending is not None:
        pending.release()


def on_cfg_denoiser(params) -> None:
    p, denoiser = _p_of(params)
    state = get_state(p) if p is not None else None
    if state is not None:
        _drop_pending(state)
    if not hc.usable(state) or state.composer is None or denoiser is None:
        return
    with _guarded(p, "preparing a step"):
        if not _prepare_pass(p, state):
            return
        st = _StepInput(params.x, params.sigma, params.image_cond, params.text_cond, params.text_uncond, denoiser,
                        int(getattr(denoiser, "step", 0)), getattr(denoiser, "model_wrap", None))
        state.extra["pending"] = st
        _fold(p, state, st, params)


def on_cfg_denoised(params) -> None:
    # CFGDenoisedParams carry no denoiser: the generation in progress is the one to look at
    ref = _current["p"]
    p = ref() if ref is not None else None
    state = get_state(p) if p is not None else None
    if state is None:
        return
    pending = state.extra.pop("pending", None)
    if pending is not None:
        pending.release()
    if not hc.usable(state) or pending is None or state.composer is None or not pending.matches(params):
        return
    with _guarded(p, "composing a step"):
        _run_step(p, state, pending, params.x, params.inner_model)


def _prepare_pass(p, state: GenerationState) -> bool:
    """Start of a sampling pass: hires conds and a restarted schedule. False: skip this pass."""
    pass_id = "hr" if getattr(p, "is_hr_pass", False) else "first"
    if state.extra.get("pass") == pass_id:
        return not state.extra.get("pass_off", False)
    state.extra["pass"] = pass_id
    state.extra["pass_off"] = False
    if id(_shared().sd_model) != state.extra.get("model_id"):
        state.extra["pass_off"] = True
        note = "the model changed during the generation (hires checkpoint?); not applied after the change"
        if note not in state.notes:
            state.notes.append(note)
        return False
    if pass_id == "hr":
        bridge = state.extra.get("bridge") or A1111Bridge()
        state.extra["conds"] = _hires_conds(p, state, bridge)
    state.composer.new_pass()
    return True


def _step_index(denoiser, eval_index: int) -> int:
    """0-based sampling step of the pass from the denoiser's evaluation count.

    ``state.sampling_step`` lags one step behind on k-diffusion samplers (it is set by the
    sampler's callback after each step); second-order samplers evaluate twice per step
    and A1111 counts that in ``total_steps``.
    """
    steps = getattr(denoiser, "steps", None) or 0
    total = getattr(denoiser, "total_steps", None) or 0
    per_step = max(1, int(total) // int(steps)) if steps and total else 1
    index = eval_index // per_step
    return min(index, steps - 1) if steps else index


def _denoised_form(denoiser) -> bool:
    """k-diffusion samplers give denoised predictions; timestep samplers give noise."""
    try:
        from modules import sd_samplers_timesteps

        return not isinstance(denoiser, sd_samplers_timesteps.CFGDenoiserTimesteps)
    except ImportError:
        return type(denoiser).__name__ != "CFGDenoiserTimesteps"


def _nrows(cond) -> int:
    return (cond["crossattn"] if isinstance(cond, dict) else cond).shape[0]


def _ntokens(cond) -> int:
    return (cond["crossattn"] if isinstance(cond, dict) else cond).shape[1]


def _sub(cond, a: int, b: int):
    if isinstance(cond, dict):
        return {k: v[a:b] for k, v in cond.items()}
    return cond[a:b]


def _cat(conds: list):
    if isinstance(conds[0], dict):  # SDXL: the host's DictWithShape keeps its type (its CFG reads ``.shape``)
        return type(conds[0])({k: torch.cat([c[k] for c in conds]) for k in conds[0]})
    return torch.cat(conds)


def _condition(text, image_cond):
    if isinstance(text, dict):
        return {**text, "c_concat": [image_cond]}
    return {"c_crossattn": [text], "c_concat": [image_cond]}


def _conds_list(p, denoiser, eval_index: int, state: GenerationState):
    """Rows of each image's sub-prompts with their AND weights, as the denoiser laid them out."""
    conds = state.extra.get("conds")
    source = None
    if conds is not None:
        source = next((c for c in conds.cond if c is not None), None)
    if source is None:
        sampler = getattr(denoiser, "sampler", None) or getattr(p, "sampler", None)
        source = (getattr(sampler, "sampler_extra_args", None) or {}).get("cond")
    if source is None:
        source = p.get_conds()[0]
    rows, out = 0, []
    for composables in source.batch:
        out.append([(rows + i, float(c.weight)) for i, c in enumerate(composables)])
        rows += len(composables)
    return out


def _branch_text(state, j: int, base_cond, base_uncond, eval_index: int):
    from modules import prompt_parser

    conds: _PassConds | None = state.extra.get("conds")
    c, uc = base_cond, base_uncond
    if conds is not None and conds.cond[j] is not None:
        _, c = prompt_parser.reconstruct_multicond_batch(conds.cond[j], eval_index)
        if conds.uncond[j] is not None:
            uc = prompt_parser.reconstruct_cond_batch(conds.uncond[j], eval_index)
    return c, uc


def _early_skip(denoiser) -> bool:
    """The host's "skip early CFG" (``skip_early_cond``): no uncond rows at this model call."""
    early = float(getattr(_shared().opts, "skip_early_cond", 0) or 0)
    step, total = int(getattr(denoiser, "step", 0) or 0), int(getattr(denoiser, "total_steps", 0) or 0)
    return early != 0 and total > 0 and step / total <= early


def _ngms_possible(p, denoiser) -> bool:
    """Whether the host's negative-guidance minimum sigma (NGMS) may skip the uncond rows at this call."""
    s_min = float(getattr(p, "s_min_uncond", 0) or 0)
    step = int(getattr(denoiser, "step", 0) or 0)
    return s_min > 0 and bool(step % 2 or getattr(_shared().opts, "s_min_uncond_all", False))


def _blocks(state, st: _StepInput, active: list[int], n_cond: int, need_uncond: bool) -> list[tuple]:
    """One block of rows per (branch, cond/uncond): ``(branch, kind, x, sigma, image_cond, text)``."""
    blocks = []
    for j in active:
        c, uc = _branch_text(state, j, st.text_cond, st.text_uncond, st.eval_index)
        blocks.append((j, "cond", st.x[:n_cond], st.sigma[:n_cond], st.image_cond[:n_cond], c))
        if need_uncond:
            blocks.append((j, "uncond", st.x[n_cond:], st.sigma[n_cond:], st.image_cond[n_cond:], uc))
    return blocks


def _fold(p, state: GenerationState, st: _StepInput, params) -> None:
    """Put the step's branch rows into the host's own model call when the host makes one call of equal texts.

    Otherwise (see :func:`_fold_refusal`) nothing changes here and ``_run_step`` runs the
    branch rows in a call of their own after the host's.
    """
    composer = state.composer
    n_uncond = _nrows(st.text_uncond)
    n_cond = st.x.shape[0] - n_uncond
    if state.router is None or n_cond != _nrows(st.text_cond) or n_cond <= 0:
        return
    active = composer.active(_step_index(st.denoiser, st.eval_index))
    if not active:
        return
    need_uncond = composer.needs_uncond and not _early_skip(st.denoiser)
    blocks = _blocks(state, st, active, n_cond, need_uncond)
    if _fold_refusal(state, st, blocks, n_cond + n_uncond):
        return
    unet = _unet_root()
    if unet is None:
        return
    n = len(state.branches)
    rows: list = [None] * n
    block_rows = []
    offset = n_cond
    for j, kind, x, _sigma, _ic, _text in blocks:
        start = offset if rows[j] is None else rows[j].start
        offset += x.shape[0]
        rows[j] = slice(start, offset)
        block_rows.append((j, kind, x.shape[0]))
    folded = _Folded(active, n_cond, n_uncond, block_rows, rows)
    params.x = torch.cat([st.x[:n_cond], *(b[2] for b in blocks), st.x[n_cond:]])
    params.sigma = torch.cat([st.sigma[:n_cond], *(b[3] for b in blocks), st.sigma[n_cond:]])
    params.image_cond = torch.cat([st.image_cond[:n_cond], *(b[4] for b in blocks), st.image_cond[n_cond:]])
    params.text_cond = _cat([st.text_cond, *(b[5] for b in blocks)])
    total = n_cond + folded.n_branch + n_uncond

    def failed(exc: BaseException) -> None:
        _fail(p, state, exc, "the model call with the branch rows")

    folded.watch = _CallWatch(state.router, unet, rows, (total, total - n_uncond), failed)
    st.folded = folded


def _fold_refusal(state, st: _StepInput, blocks: list[tuple], base_rows: int) -> str | None:
    """Why the branch rows cannot join the host's call at this step (None: they can).

    The host calls the model more than once per step on its own when ``batch_cond_uncond``
    is off (one call per image batch) or when the prompt's and the negative prompt's token
    lengths differ (cond and uncond apart); more rows would only add calls there. The
    max-rows setting bounds the rows of one call.
    """
    if not bool(getattr(_shared().opts, "batch_cond_uncond", True)):
        return "batch_cond_uncond off"
    length = _ntokens(st.text_cond)
    if _ntokens(st.text_uncond) != length or any(_ntokens(b[5]) != length for b in blocks):
        return "token lengths differ"
    if isinstance(st.text_cond, dict) and any(set(b[5]) != set(st.text_cond) for b in blocks):
        return "conditioning keys differ"
    max_rows = int(state.settings.max_rows_per_call or 0)
    if max_rows and base_rows + sum(b[2].shape[0] for b in blocks) > max_rows:
        return "more rows than max_rows_per_call"
    return None


def _unet_root() -> nn.Module | None:
    model = getattr(getattr(_shared().sd_model, "model", None), "diffusion_model", None)
    return model if isinstance(model, nn.Module) else None


def _run_step(p, state: GenerationState, st: _StepInput, x_out: torch.Tensor, inner_model) -> None:
    """Fuse the step's branch predictions into ``x_out`` in place.

    The branch rows come from the host's own call (``st.folded``: they sit between its
    cond and uncond rows) or, where they could not join it, from extra routed calls here.
    """
    composer = state.composer
    n_uncond = _nrows(st.text_uncond)
    n_cond = st.x.shape[0] - n_uncond
    folded = st.folded
    extra = folded.n_branch if folded is not None else 0
    if st.x.shape[0] + extra != x_out.shape[0] or n_cond != _nrows(st.text_cond):
        raise RuntimeError(f"unexpected batch layout: x {list(st.x.shape)}, output {list(x_out.shape)}, "
                           f"{_nrows(st.text_cond)} cond and {n_uncond} uncond rows, {extra} branch rows")
    conds_list = _conds_list(p, st.denoiser, st.eval_index, state)
    if len(conds_list) != n_uncond or sum(len(c) for c in conds_list) != n_cond:
        raise RuntimeError(f"sub-prompt layout {[len(c) for c in conds_list]} does not match {n_cond} cond rows "
                           f"for {n_uncond} images")
    first_rows = [c[0][0] for c in conds_list]
    image_of_row = [i for i, c in enumerate(conds_list) for _ in c]
    state.extra["map_rows"] = first_rows

    step = _step_index(st.denoiser, st.eval_index)
    if folded is not None:
        active = folded.active
        seen = folded.watch.rows_seen if folded.watch is not None else None
        if seen is None:
            raise RuntimeError("the host's model call did not run the branch rows")
        if folded.watch.errors:
            raise folded.watch.errors[0]
        # the host drops the uncond rows (skip early CFG, NGMS) and puts copies of cond rows there
        skipped_uncond = seen == n_cond + extra
        need_uncond = composer.needs_uncond and not skipped_uncond and any(k == "uncond" for _, k, _ in
                                                                           folded.block_rows)
        outputs = {}
        offset = n_cond
        for j, kind, n in folded.block_rows:
            outputs[(j, kind)] = x_out[offset:offset + n]
            offset += n
    else:
        active = composer.active(step)
        if not active:
            return
        skipped_uncond = _early_skip(st.denoiser) or (
            _ngms_possible(p, st.denoiser) and float(st.sigma[0]) < float(p.s_min_uncond))
        need_uncond = composer.needs_uncond and not skipped_uncond
        outputs = _branch_calls(state, _blocks(state, st, active, n_cond, need_uncond), inner_model)

    base_cond = x_out[:n_cond]
    base_uncond_rows = x_out[x_out.shape[0] - n_uncond:]
    lora_cond = torch.stack([outputs[(j, "cond")] for j in active])
    base_uncond = lora_uncond = None
    if need_uncond:
        if image_of_row == list(range(n_uncond)):  # one sub-prompt per image: the rows line up already
            base_uncond = base_uncond_rows
            lora_uncond = torch.stack([outputs[(j, "uncond")] for j in active])
        else:  # AND: each sub-prompt row against its image's uncond row (index copied without a device wait)
            idx = torch.tensor(image_of_row, dtype=torch.long).to(x_out.device, non_blocking=True)
            base_uncond = base_uncond_rows.index_select(0, idx)
            lora_uncond = torch.stack([outputs[(j, "uncond")].index_select(0, idx) for j in active])
    res = composer.fuse(step=step, active=active, base_cond=base_cond, lora_cond=lora_cond,
                        base_uncond=base_uncond, lora_uncond=lora_uncond,
                        x=st.x[:n_cond] if _denoised_form(st.denoiser) else None)
    new_uncond = None
    if need_uncond and res.uncond is not None:
        new_uncond = _per_image(res.uncond, conds_list)
    # All computed: now write in place (the denoiser keeps its own reference to x_out).
    x_out[:n_cond] = res.cond.to(x_out.dtype)
    if new_uncond is not None:
        x_out[x_out.shape[0] - n_uncond:] = new_uncond.to(x_out.dtype)
    elif skipped_uncond:
        # the "uncond" rows are copies of each image's first cond row: keep them in step
        x_out[x_out.shape[0] - n_uncond:] = x_out[first_rows]


def _branch_calls(state: GenerationState, blocks: list[tuple], inner_model) -> dict:
    """Branch predictions from routed calls of their own, ``(branch, kind) -> rows`` (the two-call path)."""
    outputs: dict[tuple[int, str], torch.Tensor] = {}
    # Rows of different token lengths cannot share a call (A1111 itself calls them apart).
    for length in sorted({_ntokens(b[5]) for b in blocks}):
        group = [b for b in blocks if _ntokens(b[5]) == length]
        counts = [b[2].shape[0] for b in group]
        results = [torch.empty_like(b[2]) for b in group]
        owner = [b[0] for b in group]
        for call in hc.plan_calls(counts, state.settings.max_rows_per_call):
            rows = hc.call_rows(call, len(state.branches), owner)
            xs = torch.cat([group[k][2][a:b] for k, a, b in call])
            sig = torch.cat([group[k][3][a:b] for k, a, b in call])
            ic = torch.cat([group[k][4][a:b] for k, a, b in call])
            text = _cat([_sub(group[k][5], a, b) for k, a, b in call])
            with state.router.route(rows):
                out = inner_model(xs, sig, cond=_condition(text, ic))
            offset = 0
            for k, a, b in call:
                results[k][a:b] = out[offset:offset + b - a]
                offset += b - a
        for block, result in zip(group, results, strict=True):
            outputs[(block[0], block[1])] = result
    return outputs


def _per_image(rows: torch.Tensor, conds_list) -> torch.Tensor:
    """One re-centred uncond per image from its sub-prompt rows, weighted by |AND weight|."""
    out = []
    for entries in conds_list:
        if len(entries) == 1:
            out.append(rows[entries[0][0]])
            continue
        weights = [abs(w) for _, w in entries]
        total = sum(weights)
        if total == 0 or not math.isfinite(total):
            weights, total = [1.0] * len(entries), float(len(entries))
        mixed = sum(rows[r].float() * (w / total) for (r, _), w in zip(entries, weights, strict=True))
        out.append(mixed.to(rows.dtype))
    return torch.stack(out)


# -- registration ----------------------------------------------------------------------------------


def _on(register, fn, name: str) -> None:
    try:
        register(fn, name=name)
    except TypeError:  # 1.6-1.8 take no name
        register(fn)


def _on_model_loaded(sd_model) -> None:
    _close_watches()
    CACHE.clear()


def _on_ui_settings() -> None:
    hc.register_options(_shared())


def _on_before_ui() -> None:
    try:
        from modules import scripts

        hc.register_xyz_axes(scripts.scripts_data)
    except Exception:
        log.exception("LoRAtorio: could not add the XYZ plot axes")


def register_callbacks() -> None:
    """Register the WebUI callbacks (once per script load; the WebUI clears them on reload)."""
    from modules import script_callbacks as cb

    _on(cb.on_cfg_denoiser, on_cfg_denoiser, "loratorio_cfg_denoiser")
    _on(cb.on_cfg_denoised, on_cfg_denoised, "loratorio_cfg_denoised")
    _on(cb.on_model_loaded, _on_model_loaded, "loratorio_model_loaded")
    _on(cb.on_ui_settings, _on_ui_settings, "loratorio_ui_settings")
    _on(cb.on_before_ui, _on_before_ui, "loratorio_xyz")


def defaults():
    return hc.configured_defaults(_shared().opts)



postprocess_image = hc.keep_image_for_map
