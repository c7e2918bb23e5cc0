"""Soak test with fault injection: random generations through the fake A1111 and Forge hosts.

Every generation draws random settings (0-5 LoRAs with random multipliers, top-k, lambda,
temperature, patch size, probe interval, pool, merge-into-base, composition map, max rows
per call, text encoder per branch, batch size and count, odd latent sizes, hires fix, AND
prompts and prompt editing, CFG scale, samplers of both prediction forms) and, in about
two thirds of them, one fault:

- an exception raised inside one of the extension's hooks (the lifecycle hooks the script
  forwards and the per-step functions they call), either before the hook's body or after
  it has done its work; inside a routed branch model call; inside the routed
  text-encoder pass; inside fusion;
- or a stop: the WebUI's interrupt or skip button at a random model call, or a
  ``KeyboardInterrupt`` inside a branch model call.

After every generation the harness checks that

- the weights of every model hash to their value at the start (parameters and buffers),
- no forward hook, pre-hook, backward hook, instance ``forward`` override or global
  module hook is left that was not there at the start, and no module is still marked
  as being routed; grad mode is back on,
- Forge: the uncloned UNet patchers carry the same model options as at the start (no
  post-CFG function, conditioning modifier, wrapper of ours) and no LoRA patch of ours,
- an injected exception was reported (console, comments or infotext), never swallowed,
- a generation without a fault produced all its images, finite latents and no error,
- the next generation without LoRAtorio is bit-identical to the same generation made
  before the extension was ever loaded,
- the generation's processing object is freed afterwards (nothing global keeps it),

and at the end of each host's run that resident memory (``VmRSS``) grew less than 2 %
after warm-up.

Usage: ``python -m tests.soak`` (100 generations, both hosts), ``python -m tests.soak
--long`` (500), ``--seed S``, ``-n N``, ``--hosts a1111,forge``. The seed is printed;
the same seed gives the same run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import hashlib
import io
import itertools
import logging
import os
import random
import sys
import tempfile
import time
import weakref
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CI_GENERATIONS = 100
LONG_GENERATIONS = 500
DEFAULT_SEED = 20250811
RSS_LIMIT = 0.02
MEMORY_MIN = 20  # generations per host below which RSS growth is noise
EXCEPTION_KINDS = ("hook", "branch", "text_encoder", "fusion")
STOP_KINDS = ("interrupt", "skip", "keyboard")
LIFECYCLE = ("process", "before_process_batch", "after_extra_networks_activate", "process_batch",
             "process_before_every_sampling", "postprocess_image", "postprocess_batch", "postprocess")
WORDS = ("cat", "castle", "forest", "robot", "portrait", "river", "lantern", "mountain", "ship", "garden",
         "storm", "owl", "market", "desert", "violin", "bridge")
NEGATIVES = ("", "blurry", "blurry, lowres, ugly", "text watermark")


class InjectedFault(RuntimeError):
    """An exception the soak harness raises on purpose."""


class InjectedInterrupt(KeyboardInterrupt):
    """A KeyboardInterrupt the soak harness raises on purpose (a real Ctrl+C is not caught)."""


def _paths() -> None:
    for path in (str(ROOT), str(ROOT / "tests")):
        if path not in sys.path:
            sys.path.insert(0, path)


# -- measurements ----------------------------------------------------------------------------------


def _malloc_trim() -> None:
    """Give glibc's free heap pages back to the system, so RSS counts live memory only."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS then includes the allocator's free pages
        pass


def rss_bytes(collect: bool = True) -> int:
    """Resident set size of this process (``/proc/self/status``) after a full garbage collection and
    ``malloc_trim``: memory the allocator keeps free for reuse is not a leak."""
    if collect:
        gc.collect()
    _malloc_trim()
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status")


def weights_hash(roots: dict[str, torch.nn.Module]) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes) of ``roots``."""
    h = hashlib.sha256()
    for prefix, root in roots.items():
        tensors = dict(root.named_parameters())
        tensors.update(dict(root.named_buffers()))
        for name in sorted(tensors):
            t = tensors[name].detach().cpu().contiguous()
            h.update(f"{prefix}.{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_HOOK_ATTRS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks", "_global_forward_hooks_with_kwargs",
                 "_global_forward_hooks_always_called", "_global_module_registration_hooks",
                 "_global_parameter_registration_hooks", "_global_buffer_registration_hooks")


def _fn_name(fn) -> str:
    if isinstance(fn, bool):
        return str(fn)
    fn = getattr(fn, "__func__", fn)
    return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', type(fn).__name__)}"


def hook_snapshot(roots: dict[str, torch.nn.Module]) -> dict[str, tuple]:
    """Every hook (by function name) and instance ``forward`` override on ``roots``, plus global module hooks."""
    snap: dict[str, tuple] = {}
    for rname, root in roots.items():
        for mname, module in root.named_modules():
            for attr in _HOOK_ATTRS:
                hooks = getattr(module, attr, None)
                if hooks:
                    snap[f"{rname}:{mname}:{attr}"] = tuple(_fn_name(h) for h in hooks.values())
            if "forward" in vars(module):
                snap[f"{rname}:{mname}:forward"] = (_fn_name(vars(module)["forward"]),)
    import torch.nn.modules.module as torch_module

    for attr in _GLOBAL_HOOKS:
        hooks = getattr(torch_module, attr, None)
        if hooks:
            snap[f"global:{attr}"] = tuple(_fn_name(h) for h in hooks.values())
    return snap


def snapshot_diff(before: dict, after: dict) -> list[str]:
    return [f"{k}: {before.get(k, ())} -> {after.get(k, ())}" for k in sorted(set(before) | set(after))
            if before.get(k, ()) != after.get(k, ())]


def options_signature(value):
    """A comparable picture of Forge ``model_options``: functions by qualified name, containers recursively."""
    if isinstance(value, dict):
        return {k: options_signature(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [options_signature(v) for v in value]
    if callable(value):
        return "fn:" + _fn_name(value)
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)}"
    return repr(value)


def texts_of(obj, depth: int = 0) -> list[str]:
    """Strings inside reported errors, comments and infotext (exceptions with their causes)."""
    if depth > 6 or obj is None:
        return []
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, BaseException):
        out = [f"{type(obj).__name__}: {obj}"]
        for inner in (obj.__cause__, obj.__context__):
            if inner is not None and inner is not obj:
                out.extend(texts_of(inner, depth + 1))
        return out
    if isinstance(obj, dict):
        return [t for k, v in obj.items() for t in texts_of(k, depth + 1) + texts_of(v, depth + 1)]
    if isinstance(obj, (list, tuple, set)):
        return [t for v in obj for t in texts_of(v, depth + 1)]
    return [str(obj)]


# -- faults ----------------------------------------------------------------------------------------


@dataclasses.dataclass
class Fault:
    kind: str = "none"  # none | hook | branch | text_encoder | fusion | interrupt | skip | keyboard
    target: str = ""  # hook name for kind == "hook"
    late: bool = False  # hook: raise after the hook's body ran
    at: int = 1  # fire at the at-th hit of the site
    token: str = ""
    fired: bool = False

    def describe(self) -> str:
        if self.kind == "none":
            return "no fault"
        where = f"{self.target}{' (after its body)' if self.late else ''}" if self.kind == "hook" else ""
        return f"{self.kind} {where} at hit {self.at}".replace("  ", " ")


@contextlib.contextmanager
def injected(fault: Fault, driver, monkeypatch):
    """Install ``fault`` for one generation; everything is undone on exit."""
    from loratorio import engine, routing

    hits = Counter()
    undo: list[tuple[object, str, object]] = []

    def patch(owner, name, value):
        undo.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def fire():
        fault.fired = True
        if fault.kind == "keyboard":
            raise InjectedInterrupt(fault.token)
        raise InjectedFault(fault.token)

    try:
        if fault.kind == "hook":
            original = getattr(driver.host, fault.target)

            def hooked(*args, **kwargs):
                hits["hook"] += 1
                if hits["hook"] == fault.at:
                    if fault.late:
                        original(*args, **kwargs)
                    fire()
                return original(*args, **kwargs)

            patch(driver.host, fault.target, hooked)
        elif fault.kind in ("branch", "text_encoder", "keyboard"):
            original_apply = routing._ModulePlan.run
            ids = driver.te_ids() if fault.kind == "text_encoder" else driver.unet_ids()

            def apply(plan, x, out, jobs):
                if id(plan.module) in ids:
                    hits["apply"] += 1
                    if hits["apply"] == fault.at:
                        fire()
                return original_apply(plan, x, out, jobs)

            patch(routing._ModulePlan, "run", apply)
        elif fault.kind == "fusion":
            original_compose = engine.compose

            def compose(*args, **kwargs):
                hits["compose"] += 1
                if hits["compose"] == fault.at:
                    fire()
                return original_compose(*args, **kwargs)

            patch(engine, "compose", compose)
        elif fault.kind in ("interrupt", "skip"):
            cls = driver.denoiser_class()
            original_forward = cls.forward

            def forward(self, *args, **kwargs):
                out = original_forward(self, *args, **kwargs)
                hits["denoiser"] += 1
                if hits["denoiser"] == fault.at:
                    fault.fired = True
                    driver.stop(fault.kind)
                return out

            patch(cls, "forward", forward)
        yield
    finally:
        for owner, name, value in reversed(undo):
            setattr(owner, name, value)


# -- generations -----------------------------------------------------------------------------------


@dataclasses.dataclass
class GenSpec:
    model: str
    prompt: str
    negative: str = ""
    seed: int = 1
    steps: int = 3
    sampler: str = "Euler"
    batch_size: int = 1
    n_iter: int = 1
    width: int = 32
    height: int = 32
    cfg: float = 5.0
    hires: bool = False
    args: list | None = None  # the script's arguments; None: the script is not attached at all
    extra: dict = dataclasses.field(default_factory=dict)  # host knobs (batch_cond_uncond, free memory, ...)
    builtin: bool = False  # a LoRA goes to the built-in (merge into base): weights legitimately change

    def describe(self) -> str:
        hr = " hires" if self.hires else ""
        return (f"{self.model} {self.sampler} {self.width}x{self.height} b{self.batch_size}x{self.n_iter} "
                f"steps {self.steps} cfg {self.cfg}{hr} {self.extra or ''} prompt {self.prompt!r} args {self.args}")


def random_spec(rng: random.Random, driver, model: str, fault: Fault | None = None) -> GenSpec:
    """Random prompt, tags and settings for one LoRAtorio generation on ``model``.

    A fault inside LoRAtorio's work needs at least one LoRA (and the text-encoder pass,
    or a hires pass, when the fault sits there) to have a chance to fire.
    """
    from loratorio.settings import Settings

    fault = fault or Fault()
    names = list(driver.loras[model])
    least = 1 if fault.kind in (*EXCEPTION_KINDS, "keyboard") else 0
    chosen = rng.sample(names, rng.randint(least, min(5, len(names))))
    if fault.kind == "text_encoder" and names[0] not in chosen:
        chosen[0] = names[0]  # the first LoRA of every set has text-encoder layers
    tags = []
    for name in chosen:
        form = rng.random()
        if form < 0.45:
            tags.append(f"<lora:{name}:{rng.choice(('1', '0.8', '0.6', '1.2'))}>")
        elif form < 0.8:
            tags.append(f"<lora:{name}:{rng.choice(('0', '0.5', '1'))}:{rng.choice(('0.7', '1', '-0.4'))}>")
        else:
            tags.append(f"<lora:{name}>")
    words = rng.sample(WORDS, 3)
    shape = rng.random()
    if shape < 0.2:
        prompt = f"{words[0]} {words[1]} AND {words[2]}:{rng.choice(('0.5', '1.3'))}"
    elif shape < 0.35:
        prompt = f"[{words[0]}:{words[1]}:{rng.choice((1, 2))}] {words[2]}"
    else:
        prompt = " ".join(words)
    parts = prompt.split(" ")
    for tag in tags:
        parts.insert(rng.randint(0, len(parts)), tag)
    prompt = " ".join(parts)
    settings = {
        "enabled": True,
        "recenter": rng.choice((0.0, 0.25, 0.5, 1.0)),
        "temperature_scale": rng.choice((1.0, 10.0, 30.0)),
        "patch_size": rng.choice((1, 2, 2, 3, 4)),
        "top_k": rng.randint(0, max(0, len(chosen))),
        "probe_every": rng.choice((1, 1, 2, 3)),
        "text_encoder_per_branch": rng.random() < 0.7 or fault.kind == "text_encoder",
        "composition_map": rng.random() < 0.3,
        "max_rows_per_call": rng.choice((0, 0, 0, 1, 2, 3)),
        "pool": [],
        "merge_into_base": [],
    }
    rest = [n for n in names if n not in chosen]
    if rest and rng.random() < 0.15:
        settings["pool"] = [rng.choice(rest)]
    if len(chosen) > least and rng.random() < 0.15:
        settings["merge_into_base"] = [rng.choice(chosen[least:])]
    if rng.random() < 0.5:
        args = [dict(settings)] if rng.random() < 0.5 else [{k: v for k, v in settings.items() if k != "enabled"}]
    else:
        args = Settings(**settings).to_args()
    width, height = rng.choice(driver.sizes[model])
    sampler = rng.choice(driver.samplers[model])
    if fault.target == "_hires_conds":
        sampler = next(s for s in driver.samplers[model] if driver.hires_ok(s))
    return GenSpec(
        model=model, prompt=prompt, negative=rng.choice(NEGATIVES), seed=rng.randint(0, 10_000),
        steps=rng.randint(2, 4), sampler=sampler, batch_size=rng.randint(1, 2),
        n_iter=rng.choice((1, 1, 2)), width=width, height=height, cfg=rng.choice(driver.cfgs[model]),
        hires=(rng.random() < 0.25 or fault.target in ("_hires_conds", "before_hr")) and driver.hires_ok(sampler),
        args=args, extra=driver.random_extra(rng),
        builtin=bool(settings["merge_into_base"]),
    )


def random_fault(rng: random.Random, driver, index: int, order: list[str], hooks: list[str],
                 counts: Counter) -> Fault:
    """No fault, an exception or a stop, a third each; exception sites and hooks are taken in turn."""
    token = f"soak-injected-{driver.name}-{index}"
    r = rng.random()
    if r < 1 / 3:
        return Fault(token=token)
    if r < 2 / 3:
        kind = order[counts["exception"] % len(order)]
        counts["exception"] += 1
        if kind == "hook":
            target = hooks[counts["hook"] % len(hooks)]
            counts["hook"] += 1
            return Fault("hook", target=target, late=rng.random() < 0.5, at=rng.choice((1, 1, 1, 2)), token=token)
        at = {"branch": rng.randint(1, 30), "text_encoder": rng.randint(1, 6), "fusion": rng.randint(1, 5)}[kind]
        return Fault(kind, at=at, token=token)
    kind = rng.choice(STOP_KINDS)
    return Fault(kind, at=rng.randint(1, 30) if kind == "keyboard" else rng.randint(1, 5), token=token)


# -- host drivers ----------------------------------------------------------------------------------


def load_file_numpy(path, device="cpu"):
    """``safetensors.torch.load_file`` through the numpy binding.

    The torch binding of safetensors keeps about 60 bytes per tensor per load
    (safetensors issue 369, seen with 0.4.5 and 0.8.0 here); WebUI-style loaders read
    LoRA files at every generation, which would swamp the memory check of the
    extension itself. The numpy path gives the same tensors and frees everything.
    """
    from safetensors.numpy import load_file

    return {k: torch.from_numpy(v.copy()).to(device) for k, v in load_file(str(path)).items()}


def _lora_set(write: Callable, prefix: str, unet: dict, te: dict) -> list[str]:
    """Six LoRAs of different shapes and types on one model: full, attention + text encoder, convolutions,
    LoHa, text encoder only, and a high-rank one with a small alpha."""
    attn = {k: v for k, v in unet.items() if "attn" in k}
    conv = {k: v for k, v in unet.items() if len(v) == 4}
    linear = {k: v for k, v in unet.items() if len(v) == 2}
    write(f"{prefix}0", {**unet, **te}, rank=4, seed=1)
    write(f"{prefix}1", {**attn, **te}, rank=2, seed=2, std=0.3)
    write(f"{prefix}2", conv or unet, rank=3, seed=3)
    write(f"{prefix}3", linear, rank=2, seed=4, kind="loha")
    write(f"{prefix}4", te or attn, rank=4, seed=5)
    write(f"{prefix}5", unet, rank=8, alpha=1.0, seed=6, std=0.3)
    return [f"{prefix}{i}" for i in range(6)]


class _Driver:
    name = ""
    inner_hooks: tuple[str, ...] = ()

    def __init__(self):
        self.loras: dict[str, list[str]] = {}
        self.sizes: dict[str, list[tuple[int, int]]] = {}
        self.samplers: dict[str, tuple[str, ...]] = {}
        self.cfgs: dict[str, tuple[float, ...]] = {}
        self.plain: dict[str, list[GenSpec]] = {}
        self.references: dict[tuple[str, int], torch.Tensor] = {}

    def hook_names(self) -> list[str]:
        return [n for n in (*LIFECYCLE, *self.inner_hooks) if callable(getattr(self.host, n, None))]

    def random_extra(self, rng) -> dict:
        return {}

    def hires_ok(self, sampler: str) -> bool:
        return True

    def plain_specs(self, model: str) -> list[GenSpec]:
        """Two plain generations per model; the second tags a LoRA the soak also composes, for the built-in
        LoRA (whose merges and conditioning cache must not be disturbed by LoRAtorio)."""
        style = self.loras[model][0]
        base = dict(model=model, negative="blurry", seed=1234, steps=3, sampler=self.samplers[model][0],
                    batch_size=2, width=40, height=24, cfg=self.cfgs[model][-1])
        return [GenSpec(prompt="a quiet lake at dawn", **base),
                GenSpec(prompt=f"a red fox <lora:{style}:0.7> in snow", **base)]

    def record_references(self) -> None:
        """Plain generations made before the extension is loaded (run twice: they must be deterministic).

        The second reference uses a tag the built-in LoRA merges; a plain generation without
        tags afterwards must give the pristine weights back (the built-in restores them).
        """
        pristine = weights_hash(self.weight_roots())
        for model in self.models:
            self.plain[model] = self.plain_specs(model)
            for i, spec in enumerate(self.plain[model]):
                first = self.latents(self.generate(spec))
                second = self.latents(self.generate(spec))
                if not torch.equal(first, second):
                    raise AssertionError(f"{self.name}: the plain reference {spec.describe()} is not deterministic")
                self.references[(model, i)] = first
            self.generate(self.plain[model][0])
        if weights_hash(self.weight_roots()) != pristine:
            raise AssertionError(f"{self.name}: the built-in LoRA did not restore the weights after its merge")

    @staticmethod
    def latents(processed) -> torch.Tensor:
        lat = processed.latents
        if isinstance(lat, torch.Tensor):
            return lat.detach().clone()
        return torch.stack([t for t in lat if t is not None]).detach().clone()

    def weight_roots(self) -> dict[str, torch.nn.Module]:
        raise NotImplementedError

    def leftovers(self) -> list[str]:
        return []


class A1111Driver(_Driver):
    """The fake A1111 1.10 (``tests/fake_a1111``) with an SD1-like and an SD2-like (OpenCLIP) model."""

    name = "a1111"
    inner_hooks = ("_prepare_pass", "_run_step", "_first_pass_conds", "_hires_conds", "_branch_conds",
                   "_text_encoder_branch", "convert_network")

    def setup(self, monkeypatch, tmp: Path) -> None:
        from tests import fake_a1111 as fa
        from tests.fake_a1111.model import TinySD
        from tests.lora_files import conv_and_linear_shapes, write_lora

        self.fa = fa
        self.models = {"sd1": TinySD("clip", seed=0, name="sd1.safetensors"),
                       "sd2": TinySD("openclip", seed=1, name="sd2.safetensors")}
        lora_dir = tmp / "Lora"
        for key, model in self.models.items():
            unet = conv_and_linear_shapes(model.model.diffusion_model, "lora_unet_",
                                          include=["attn", "proj", "ff", "in_layers", "emb_layers"])
            te = {}
            for name, shape in conv_and_linear_shapes(model.cond_stage_model.wrapped, "",
                                                      include=["self_attn", "mlp", "attn"]).items():
                te["lora_te_" + name.removeprefix("transformer_")] = shape
            if key == "sd2":  # q/k/v of OpenCLIP's packed attention, as kohya names them
                for i in range(2):
                    for proj in ("q_proj", "k_proj", "v_proj"):
                        te[f"lora_te_model_transformer_resblocks_{i}_attn_{proj}"] = (32, 32)

            def write(name, shapes, **kw):
                write_lora(lora_dir / f"{name}.safetensors", shapes, **kw)

            self.loras[key] = _lora_set(write, f"{key}_", unet, te)
            self.sizes[key] = [(32, 32), (40, 24), (24, 48), (56, 40)]
            self.samplers[key] = ("Euler", "Heun", "DDIM")
            self.cfgs[key] = (2.0, 5.0, 7.0)
        self.ns = fa.install(monkeypatch, model=self.models["sd1"], lora_dir=lora_dir)
        self.builtin_merged = False
        networks = self.ns.networks
        apply_weights = networks.network_apply_weights

        def network_apply_weights(module):
            if networks.loaded_networks:
                self.builtin_merged = True
            return apply_weights(module)

        monkeypatch.setattr(networks, "network_apply_weights", network_apply_weights)
        monkeypatch.setattr(networks, "load_file", load_file_numpy)
        self.current = "sd1"
        self.record_references()
        self.script, self.runner = fa.load_script(self.ns)
        from loratorio import host_a1111

        self.host = host_a1111

    def select(self, model: str) -> None:
        if model != self.current:
            self.fa.set_model(self.ns, self.models[model])
            self.current = model

    def hires_ok(self, sampler: str) -> bool:
        return True

    def random_extra(self, rng) -> dict:
        extra = {}
        if rng.random() < 0.15:
            extra["batch_cond_uncond"] = False
        if rng.random() < 0.15:
            extra["s_min_uncond"] = 5.0
        return extra

    def generate(self, spec: GenSpec, holder: list | None = None):
        from loratorio.settings import Settings

        self.select(spec.model)
        self.ns.shared.opts.batch_cond_uncond = spec.extra.get("batch_cond_uncond", True)
        runner = self.runner if spec.args is not None else None
        args = spec.args if spec.args is not None else Settings().to_args()
        p = self.fa.make_p(self.ns, runner, args, prompt=spec.prompt, negative_prompt=spec.negative, seed=spec.seed,
                           steps=spec.steps, sampler_name=spec.sampler, batch_size=spec.batch_size,
                           n_iter=spec.n_iter, width=spec.width, height=spec.height, cfg_scale=spec.cfg,
                           enable_hr=spec.hires, hr_scale=1.5, hr_second_pass_steps=2, denoising_strength=0.5,
                           s_min_uncond=spec.extra.get("s_min_uncond", 0.0))
        if holder is not None:
            holder.append(p)
        return self.ns.processing.process_images(p)

    def weight_roots(self):
        return dict(self.models)

    def unet_ids(self) -> set[int]:
        return {id(m) for model in self.models.values() for m in model.model.diffusion_model.modules()}

    def te_ids(self) -> set[int]:
        return {id(m) for model in self.models.values() for m in model.cond_stage_model.modules()}

    def denoiser_class(self):
        return self.ns.sd_samplers_cfg_denoiser.CFGDenoiser

    def stop(self, kind: str) -> None:
        if kind == "skip":
            self.ns.shared.state.skipped = True
        else:
            self.ns.shared.state.interrupt()

    def reported(self) -> list:
        return list(self.ns.errors.reported)

    def clear_records(self) -> None:
        self.ns.errors.reported.clear()
        self.ns.sd_samplers_cfg_denoiser.model_calls.clear()
        self.ns.networks.load_calls.clear()
        self.builtin_merged = False


class _GuardedScript:
    """The script as the WebUI's script runner calls it: a hook's exception is reported, the generation goes on.

    Forge's runner (as A1111's) wraps every always-on script hook in ``try/except``
    (``modules/scripts.py``); the fake Forge runner does not, so the soak adds it here.
    """

    def __init__(self, script):
        self._script = script
        self.args_from = self.args_to = 0

    def __getattr__(self, name):
        attr = getattr(self._script, name)
        if name not in LIFECYCLE or not callable(attr):
            return attr

        def call(*args, **kwargs):
            try:
                return attr(*args, **kwargs)
            except Exception:
                from modules import errors

                exc = sys.exc_info()[1]
                errors.display(exc, f"Error running {name}: {self._script.filename}")

        return call


class ForgeDriver(_Driver):
    """The fake Forge (``tests/fake_forge``) with an SD1.5-like engine and a Flux-like engine."""

    name = "forge"
    inner_hooks = ("install_pass", "branch_texts", "_post_cfg", "_run_branches", "_compile_step_texts",
                   "_release_pass")

    def setup(self, monkeypatch, tmp: Path) -> None:
        _paths()
        from fake_forge.harness import Env, make_env

        tmp.mkdir(parents=True, exist_ok=True)
        env = make_env(monkeypatch, tmp, "sd15", seed=0, with_script=False)
        from backend.diffusion_engine.engines import FakeEngine
        from modules import shared

        self.shared = shared
        self.builtin_merged = False
        from backend.patcher.lora import LoraLoader

        refresh = LoraLoader.refresh

        def refresh_spy(loader, lora_patches, *args, **kwargs):
            if any(lora_patches.values()):
                self.builtin_merged = True
            return refresh(loader, lora_patches, *args, **kwargs)

        monkeypatch.setattr(LoraLoader, "refresh", refresh_spy)
        import backend.utils

        monkeypatch.setattr(backend.utils, "load_file", load_file_numpy)
        flux = Env("flux", FakeEngine("flux", seed=1), env.lora_dir)
        self.envs = {"sd15": env, "flux": flux}
        self.models = {k: e.engine for k, e in self.envs.items()}
        sd_unet, sd_te = env.unet_layers(), env.te_layers()
        self.loras["sd15"] = _lora_set(env.write, "sd15_", sd_unet, sd_te)
        fx_unet = flux.unet_layers()
        fx_te = {**flux.te_layers("clip_l"), **flux.te_layers("t5xxl", include=("SelfAttention.q", "wi"))}
        self.loras["flux"] = _lora_set(flux.write, "flux_", fx_unet, fx_te)
        self.loras["flux"].append(self._write_packed_flux(flux))
        self.sizes = {"sd15": [(32, 32), (40, 24), (24, 48), (56, 40)], "flux": [(32, 32), (48, 32), (40, 24)]}
        self.samplers = {"sd15": ("Euler", "Heun"), "flux": ("Euler", "Heun")}
        self.cfgs = {"sd15": (1.0, 5.0, 7.0), "flux": (1.0, 1.0, 3.5)}
        self.options0 = {k: self._options(e) for k, e in self.models.items()}
        self.current = "sd15"
        shared.sd_model = self.models["sd15"]
        self.record_references()
        from fake_forge.harness import load_script

        module, script = load_script()
        monkeypatch.setitem(sys.modules, module.__name__, module)
        self.script = _GuardedScript(script)
        from loratorio import host_forge

        self.host = host_forge
        host_forge.CACHE.clear()

    @staticmethod
    def _write_packed_flux(env) -> str:
        """A diffusers-keyed Flux LoRA: to_q/to_k/to_v land in slices of the packed qkv weights."""
        from lora_files import write_raw

        net = env.engine.forge_objects.unet.model.diffusion_model
        h = net.config["hidden_size"]
        gen = torch.Generator().manual_seed(8)
        tensors = {}
        for i in range(net.config["depth"]):
            for proj in ("to_q", "to_k", "to_v"):
                base = f"transformer.transformer_blocks.{i}.attn.{proj}"
                tensors[f"{base}.lora_A.weight"] = torch.randn(2, h, generator=gen) * 0.3
                tensors[f"{base}.lora_B.weight"] = torch.randn(h, 2, generator=gen) * 0.3
                tensors[f"{base}.alpha"] = torch.tensor(2.0)
        write_raw(env.lora_dir / "flux_packed.safetensors", tensors)
        import networks

        networks.list_available_networks()
        return "flux_packed"

    @staticmethod
    def _options(engine) -> dict:
        return {
            "original unet options": options_signature(engine.forge_objects_original.unet.model_options),
            "original unet patches": sorted(map(str, engine.forge_objects_original.unet.lora_patches)),
            "original clip patches": sorted(map(str, engine.forge_objects_original.clip.patcher.lora_patches)),
        }

    def select(self, model: str) -> None:
        self.shared.sd_model = self.models[model]
        self.current = model

    def random_extra(self, rng) -> dict:
        return {"free_memory": 3e6} if rng.random() < 0.15 else {}

    def generate(self, spec: GenSpec, holder: list | None = None):
        from backend import memory_management
        from modules import processing, scripts

        self.select(spec.model)
        memory_management.FREE_MEMORY = spec.extra.get("free_memory", float(1 << 40))
        runner = None
        args: list = []
        if spec.args is not None:
            runner = scripts.ScriptRunner([self.script])
            args = list(spec.args)
            self.script.args_from, self.script.args_to = 0, len(args)
        p = processing.StableDiffusionProcessingTxt2Img(
            self.models[spec.model], prompt=spec.prompt, negative_prompt=spec.negative, seed=spec.seed,
            steps=spec.steps, cfg_scale=spec.cfg, width=spec.width, height=spec.height, batch_size=spec.batch_size,
            n_iter=spec.n_iter, sampler_name=spec.sampler, scripts=runner, script_args=args, enable_hr=spec.hires,
            hr_scale=1.5, hr_second_pass_steps=2, denoising_strength=0.5)
        if holder is not None:
            holder.append(p)
        try:
            return processing.process_images(p)
        finally:
            memory_management.FREE_MEMORY = float(1 << 40)

    def weight_roots(self):
        out = {}
        for key, engine in self.models.items():
            out[f"{key}.unet"] = engine.forge_objects_original.unet.model
            out[f"{key}.te"] = engine.text_encoders
        return out

    def unet_ids(self) -> set[int]:
        return {id(m) for e in self.models.values() for m in e.forge_objects_original.unet.model.modules()}

    def te_ids(self) -> set[int]:
        return {id(m) for e in self.models.values() for m in e.text_encoders.modules()}

    def denoiser_class(self):
        from modules import sd_samplers_cfg_denoiser

        return sd_samplers_cfg_denoiser.CFGDenoiser

    def stop(self, kind: str) -> None:
        if kind == "skip":
            self.shared.state.skipped = True
        else:
            self.shared.state.interrupt()

    def reported(self) -> list:
        from modules import errors

        return list(errors.REPORTED)

    def clear_records(self) -> None:
        import networks
        from backend import memory_management
        from backend.sampling import sampling_function
        from modules import errors

        errors.REPORTED.clear()
        self.builtin_merged = False
        memory_management.LOADS.clear()
        sampling_function.CALLS.clear()
        networks.LOADS.clear()

    def leftovers(self) -> list[str]:
        out = []
        for key, engine in self.models.items():
            now = self._options(engine)
            for what, value in now.items():
                if value != self.options0[key][what]:
                    out.append(f"{key}: {what} changed: {self.options0[key][what]} -> {value}")
        return out


DRIVERS = {"a1111": A1111Driver, "forge": ForgeDriver}


# -- single-model hosts for focused tests ------------------------------------------------------------


class Result:
    """What one generation left: the processing object, the images, and every text the user sees."""

    def __init__(self, p, processed, reported, interrupted):
        self.p = p
        self.processed = processed
        self.state = getattr(p, "loratorio_state", None)
        self.params = dict(p.extra_generation_params)
        self.info = processed.infotexts[0] if processed.infotexts else ""
        self.comments = processed.comments.splitlines()  # the lines the UI shows under the images
        self.reported = reported
        self.interrupted = interrupted
        lat = processed.latents
        if isinstance(lat, (list, tuple)):
            lat = torch.stack(lat) if lat else None
        self.latents = lat

    @property
    def names(self) -> list[str]:
        return self.state.names if self.state is not None else []


def _enabled_args(settings) -> list:
    from loratorio.settings import Settings

    if settings is False:
        return Settings().to_args()
    return Settings(**{"enabled": True, **(settings or {})}).to_args()


class A1111Host:
    """The fake A1111 with one SD1-like model, a LoRA folder and the real script."""

    name = "a1111"

    def __init__(self, monkeypatch, tmp_path):
        from tests import fake_a1111 as fa
        from tests.fake_a1111.model import TinySD
        from tests.lora_files import conv_and_linear_shapes

        self.fa = fa
        self.tmp = tmp_path
        self.lora_dir = tmp_path / "Lora"
        self.lora_dir.mkdir()
        self.model = TinySD()
        self.unet = conv_and_linear_shapes(self.model.model.diffusion_model, "lora_unet_",
                                           include=["attn", "proj", "ff", "in_layers", "emb_layers"])
        self.te = {"lora_te_" + k.removeprefix("transformer_"): v for k, v in conv_and_linear_shapes(
            self.model.cond_stage_model.wrapped, "", include=["self_attn", "mlp"]).items()}
        self.ns = fa.install(monkeypatch, model=self.model, lora_dir=self.lora_dir)
        self.script, self.runner = fa.load_script(self.ns)
        from loratorio import host_a1111

        self.host = host_a1111
        host_a1111.CACHE.clear()

    def refresh(self):
        self.ns.networks.list_available_networks()

    def other_model(self, seed=1):
        from tests.fake_a1111.model import TinySD

        return TinySD(seed=seed, name=f"other-{seed}.safetensors")

    def switch(self, model):
        self.fa.set_model(self.ns, model)

    def run(self, prompt, settings=None, *, args=None, prepare=None, **kw) -> Result:
        args = args if args is not None else _enabled_args(settings)
        kw = {"negative_prompt": "ugly", "seed": 3, "steps": 2, "width": 32, "height": 32, **kw}
        p = self.fa.make_p(self.ns, self.runner, args, prompt=prompt, **kw)
        if prepare is not None:
            prepare(p)
        self.ns.errors.reported.clear()
        processed = self.ns.processing.process_images(p)
        reported = [str(m) for m, _ in self.ns.errors.reported]
        return Result(p, processed, reported, self.ns.shared.state.interrupted)

    def loads(self) -> list[str]:
        return list(self.ns.networks.load_calls)

    def weights(self):
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}


class ForgeHost:
    """The fake Forge with an SD1.5-like engine, a LoRA folder and the real script."""

    name = "forge"

    def __init__(self, monkeypatch, tmp_path):
        from fake_forge.harness import make_env

        self.env = make_env(monkeypatch, tmp_path, "sd15")
        self.tmp = tmp_path
        self.lora_dir = self.env.lora_dir
        self.engine = self.env.engine
        self.model = self.engine
        self.script = self.env.script
        self.unet = self.env.unet_layers()
        self.te = self.env.te_layers()
        from loratorio import host_forge

        self.host = host_forge

    def refresh(self):
        import networks

        networks.list_available_networks()

    def other_model(self, seed=1, kind="sd15"):
        from backend.diffusion_engine.engines import FakeEngine

        return FakeEngine(kind, seed=seed)

    def switch(self, engine):
        from modules import shared

        shared.sd_model = engine
        self.engine = engine

    def run(self, prompt, settings=None, *, args=None, prepare=None, **kw) -> Result:
        from modules import errors, processing, scripts, shared

        args = list(args if args is not None else _enabled_args(settings))
        runner = scripts.ScriptRunner([self.script])
        self.script.args_from, self.script.args_to = 0, len(args)
        kw = {"negative_prompt": "ugly", "seed": 3, "steps": 2, "width": 32, "height": 32, "cfg_scale": 5.0, **kw}
        p = processing.StableDiffusionProcessingTxt2Img(self.engine, prompt=prompt, scripts=runner, script_args=args,
                                                        **kw)
        if prepare is not None:
            prepare(p)
        errors.REPORTED.clear()
        processed = processing.process_images(p)
        reported = [f"{task}: {exc}" for exc, task in errors.REPORTED]
        return Result(p, processed, reported, shared.state.interrupted)

    def loads(self) -> list[str]:
        return []

    def weights(self):
        out = {}
        for prefix, module in (("unet.", self.engine.forge_objects_original.unet.model),
                               ("te.", self.engine.text_encoders)):
            out.update({prefix + k: v.detach().clone() for k, v in module.state_dict().items()})
        return out


def light_host(name: str, monkeypatch, tmp_path):
    """A single-model fake host (``a1111`` or ``forge``) with the real script and an empty LoRA folder."""
    _paths()
    return A1111Host(monkeypatch, tmp_path) if name == "a1111" else ForgeHost(monkeypatch, tmp_path)


# -- the run ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class HostReport:
    host: str
    seed: int
    generations: int = 0
    failures: list[str] = dataclasses.field(default_factory=list)
    faults: Counter = dataclasses.field(default_factory=Counter)  # kind -> planned
    fired: Counter = dataclasses.field(default_factory=Counter)  # kind -> fired
    hooks: list = dataclasses.field(default_factory=list)  # the hooks faults can be injected into
    hooks_fired: Counter = dataclasses.field(default_factory=Counter)  # hook name -> fired
    escaped: Counter = dataclasses.field(default_factory=Counter)  # exception type that left process_images
    composed: int = 0  # generations that composed at least one LoRA
    rss_first: tuple = (0, 0)  # RSS after warm-up and at the end of the first pass
    rss_warm: int = 0  # RSS at the start of the replay (after the first pass without replay)
    rss_end: int = 0
    rss_peak: int = 0
    rss_trace: list = dataclasses.field(default_factory=list)  # RSS after every generation
    seconds: float = 0.0

    @property
    def rss_growth(self) -> float:
        return (self.rss_end - self.rss_warm) / self.rss_warm if self.rss_warm else 0.0

    @property
    def rss_first_growth(self) -> float:
        warm, end = self.rss_first
        return (end - warm) / warm if warm else 0.0

    def summary(self) -> str:
        mb = 2**20
        return (f"[{self.host}] seed {self.seed}: {self.generations} generations (plan + replay) "
                f"in {self.seconds:.1f} s, "
                f"{self.composed} composed LoRAs; faults planned {dict(self.faults)}, fired {dict(self.fired)}; "
                f"hooks hit {dict(self.hooks_fired)}; left process_images: {dict(self.escaped)}; "
                f"RSS first pass {self.rss_first[0] / mb:.1f} -> {self.rss_first[1] / mb:.1f} MB "
                f"({100 * self.rss_first_growth:+.2f} %, new shapes), replay {self.rss_warm / mb:.1f} -> "
                f"{self.rss_end / mb:.1f} MB ({100 * self.rss_growth:+.2f} %), peak {self.rss_peak / mb:.1f} MB "
                f"(trace MB: {' '.join(f'{r / mb:.1f}' for r in self.rss_trace[::max(1, len(self.rss_trace) // 10)])}"
                f"); "
                f"{len(self.failures)} failure(s)")


def _check_generation(driver, report: HostReport, index: int, spec: GenSpec, fault: Fault, processed,
                      escaped: BaseException | None, p, baseline: dict, printed: str = "") -> None:
    fail = report.failures.append
    label = f"[{driver.name} #{index}] {fault.describe()}; {spec.describe()}"

    after = hook_snapshot(driver.weight_roots())
    diff = snapshot_diff(baseline["hooks"], after)
    if diff:
        fail(f"{label}: hooks left: {diff[:5]}")
    from loratorio import routing

    if len(routing._ACTIVE):
        fail(f"{label}: {len(routing._ACTIVE)} module(s) still marked as routed")
    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        fail(f"{label}: grad mode left changed (grad {torch.is_grad_enabled()}, "
             f"inference {torch.is_inference_mode_enabled()})")
        torch.set_grad_enabled(True)
    for problem in driver.leftovers():
        fail(f"{label}: {problem}")
    state = getattr(p, "loratorio_state", None)
    usable = state is not None and state.error is None and state.refused is None
    if driver.builtin_merged and not spec.builtin and usable and not fault.fired:
        fail(f"{label}: the built-in LoRA merged weights although LoRAtorio composed every tag")
    if not driver.builtin_merged:
        # with the built-in's merge (merge into base, or LoRAtorio switched off by an error) the weights
        # legitimately differ until its next restore; the check after the next plain generation covers it
        now = weights_hash(driver.weight_roots())
        if now != baseline["weights"]:
            fail(f"{label}: model weights changed by the generation")

    if state is not None and state.names and state.refused is None:
        report.composed += 1
    reported = texts_of(driver.reported()) + texts_of(escaped) + [printed]
    reported += texts_of(getattr(p, "comments", None)) + texts_of(getattr(p, "extra_generation_params", None))
    if fault.fired and fault.kind in EXCEPTION_KINDS and not any(fault.token in t for t in reported):
        fail(f"{label}: the injected exception was not reported anywhere (console, comments, infotext)")
    if not fault.fired:
        if escaped is not None:
            fail(f"{label}: a generation without a fault raised {type(escaped).__name__}: {escaped}")
            return
        errors = [t for t in texts_of(driver.reported())]
        if errors:
            fail(f"{label}: a generation without a fault reported errors: {errors[:3]}")
        expected = spec.batch_size * spec.n_iter
        if len(processed.images) < expected:
            fail(f"{label}: {len(processed.images)} images for {expected} expected")
        lat = driver.latents(processed)
        if lat.shape[0] != expected or not torch.isfinite(lat).all():
            fail(f"{label}: latents {list(lat.shape)} finite={bool(torch.isfinite(lat).all())}")
        if state is not None and state.error is not None:
            fail(f"{label}: state.error set without a fault: {state.error!r}")


def _plain_check(driver, report: HostReport, index: int, model: str, which: int, baseline: dict,
                 label: str) -> None:
    spec = dataclasses.replace(driver.plain[model][which], args=driver_disabled_args())
    lat = driver.latents(driver.generate(spec))
    ref = driver.references[(model, which)]
    if lat.shape != ref.shape or not torch.equal(lat, ref):
        diff = (lat - ref).abs().max().item() if lat.shape == ref.shape else "shape"
        report.failures.append(f"[{driver.name} #{index}] {label}: the next plain generation "
                               f"({spec.prompt!r} on {model}) differs from the run without the extension "
                               f"(max abs diff {diff})")
    errors = texts_of(driver.reported())
    if errors:
        report.failures.append(f"[{driver.name} #{index}] plain generation reported errors: {errors[:3]}")
    driver.clear_records()


def driver_disabled_args() -> list:
    from loratorio.settings import Settings

    return Settings().to_args()


@contextlib.contextmanager
def console():
    """What a generation prints or logs: the WebUI's console (stdout, stderr, log records) as text."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield buffer
    finally:
        root.removeHandler(handler)


def run_generation(driver, report: HostReport, index: int, spec: GenSpec, fault: Fault, baseline: dict,
                   monkeypatch) -> None:
    """One LoRAtorio generation with its fault, the checks, and the plain generation(s) after it."""
    host = driver.name
    report.faults[fault.kind] += 1
    escaped = None
    processed = None
    holder: list = []
    with console() as printed, injected(fault, driver, monkeypatch):
        try:
            processed = driver.generate(spec, holder)
        except (Exception, InjectedInterrupt) as exc:
            escaped = exc
        except KeyboardInterrupt as exc:
            if fault.kind == "keyboard" and fault.fired:
                escaped = exc
            else:
                raise
    if fault.fired:
        report.fired[fault.kind] += 1
        if fault.kind == "hook":
            report.hooks_fired[fault.target] += 1
    if escaped is not None:
        report.escaped[type(escaped).__name__] += 1
    p = holder[0] if holder else None
    _check_generation(driver, report, index, spec, fault, processed, escaped, p, baseline, printed.getvalue())
    p_ref = weakref.ref(p) if p is not None else None
    del p, holder, processed, escaped
    driver.clear_records()
    label = fault.describe()
    if index % 3 == 2:
        _plain_check(driver, report, index, spec.model, 1, baseline, label)
    _plain_check(driver, report, index, spec.model, 0, baseline, label)
    if weights_hash(driver.weight_roots()) != baseline["weights"]:
        report.failures.append(f"[{host} #{index}] {label}: weights differ from the start after the next plain "
                               "generation")
        baseline["weights"] = weights_hash(driver.weight_roots())
    gc.collect()
    if p_ref is not None and p_ref() is not None:
        holders = [type(r).__name__ for r in gc.get_referrers(p_ref()) if r is not sys._getframe()]
        report.failures.append(f"[{host} #{index}] {label}: the processing object is still alive after the next "
                               f"generation (referenced by {holders[:6]})")
    report.generations += 1
    report.rss_trace.append(rss_bytes(collect=False))


def start(host: str, monkeypatch, tmp: Path):
    """A host driver set up (fake WebUI installed, models, LoRA files, plain references, the script loaded)
    and the baseline the checks compare with: ``(driver, {"weights": hash, "hooks": snapshot})``."""
    _paths()
    driver = DRIVERS[host]()
    driver.setup(monkeypatch, tmp)
    driver.clear_records()
    return driver, {"weights": weights_hash(driver.weight_roots()), "hooks": hook_snapshot(driver.weight_roots())}


def plan(driver, n: int, seed: int) -> list[tuple[GenSpec, Fault]]:
    """The run's generations: random settings and faults from ``seed`` (the same seed, the same plan)."""
    rng = random.Random(f"{seed}-{driver.name}")
    order = ["hook", "hook", *EXCEPTION_KINDS[1:]]
    rng.shuffle(order)
    hooks = driver.hook_names()
    rng.shuffle(hooks)
    counts: Counter = Counter()
    models = list(driver.models)
    out = []
    for index in range(n):
        model = models[index % len(models)] if index < len(models) else rng.choice(models)
        fault = random_fault(rng, driver, index, order, hooks, counts)
        out.append((random_spec(rng, driver, model, fault), fault))
    return out


def run_host(host: str, n: int, seed: int, monkeypatch, tmp: Path, log: Callable[[str], None] = print,
             replay: bool = True) -> HostReport:
    """``n`` random LoRAtorio generations (with faults) on one fake host; see the module docstring.

    Memory: the first pass meets every tensor shape of the run once, and the math
    libraries keep per-shape kernels (oneDNN's primitive cache holds up to 1024), so RSS
    grows there without any leak. The plan is then replayed (same settings, same faults,
    all checks again) and the growth over the replay is the leak measure
    (``HostReport.rss_growth``); the first pass's growth is reported too.
    """
    _paths()
    report = HostReport(host=host, seed=seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is fastest, and 2 shared cores are not oversubscribed
    began = time.perf_counter()
    try:
        driver, baseline = start(host, monkeypatch, tmp)
        report.hooks = driver.hook_names()
        log(f"[{host}] soak seed {seed}: {n} generations{' and their replay' if replay else ''}; "
            f"hooks that can fail: {', '.join(driver.hook_names())}")
        # warm-up: every LoRA of every model loaded once, no faults (not counted)
        for model in driver.models:
            tags = " ".join(f"<lora:{name}:0.5>" for name in driver.loras[model][:5])
            warm = dataclasses.replace(driver.plain[model][0], prompt=f"warm up {tags}", args=[{"pool": []}])
            driver.generate(warm)
            extra = driver.loras[model][5:]
            if extra:
                driver.generate(dataclasses.replace(warm, prompt="warm " + " ".join(f"<lora:{x}>" for x in extra)))
            driver.clear_records()
        generations = plan(driver, n, seed)
        # Everything alive now (torch, the fakes, the models) is left out of the collections below:
        # a full collection over it takes a quarter second, and only the generations' garbage matters.
        gc.collect()
        gc.freeze()
        passes = ("first", "replay") if replay else ("first",)
        warm_until = max(3, n // 5)
        for which in passes:
            if which == "replay":
                report.rss_first = (report.rss_warm, report.rss_end)
                report.rss_warm = rss_bytes()
            for index, (spec, fault) in enumerate(generations):
                fresh = dataclasses.replace(fault, fired=False)
                run_generation(driver, report, index, spec, fresh, baseline, monkeypatch)
                rss = report.rss_trace[-1]
                report.rss_peak = max(report.rss_peak, rss)
                if which == "first" and index + 1 == warm_until:
                    report.rss_warm = rss
                report.rss_end = rss
                if (index + 1) % 25 == 0:
                    log(f"[{host}] {which} pass {index + 1}/{n}, {len(report.failures)} failure(s), "
                        f"RSS {rss / 2**20:.1f} MB")
    finally:
        gc.unfreeze()
        torch.set_num_threads(threads)
        report.seconds = time.perf_counter() - began
    log(report.summary())
    return report


def run(n: int = CI_GENERATIONS, seed: int = DEFAULT_SEED, hosts=("a1111", "forge"), tmp: Path | None = None,
        log: Callable[[str], None] = print) -> list[HostReport]:
    """``n`` generations split across ``hosts`` (each with its own fake WebUI installed, then removed)."""
    import pytest

    reports = []
    share = [n // len(hosts) + (1 if i < n % len(hosts) else 0) for i in range(len(hosts))]
    with contextlib.ExitStack() as stack:
        base = Path(tmp) if tmp is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        for host, count in zip(hosts, share):
            with pytest.MonkeyPatch.context() as mp:
                reports.append(run_host(host, count, seed, mp, base / host, log))
    return reports


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--long", action="store_true", help=f"{LONG_GENERATIONS} generations")
    parser.add_argument("-n", type=int, default=None, help=f"generations (default {CI_GENERATIONS})")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: fixed, printed)")
    parser.add_argument("--hosts", default="a1111,forge", help="comma-separated: a1111, forge")
    opts = parser.parse_args(argv)
    n = opts.n if opts.n is not None else (LONG_GENERATIONS if opts.long else CI_GENERATIONS)
    seed = opts.seed if opts.seed is not None else int(os.environ.get("LORATORIO_SOAK_SEED", DEFAULT_SEED))
    print(f"LoRAtorio soak: {n} generations, seed {seed}")
    reports = run(n, seed, tuple(h.strip() for h in opts.hosts.split(",") if h.strip()))
    bad = 0
    for r in reports:
        for line in itertools.islice(r.failures, 50):
            print("FAIL", line)
        if r.generations < 2 * MEMORY_MIN:
            print(f"[{r.host}] memory not judged: it needs at least {MEMORY_MIN} generations per host")
        elif r.rss_growth >= RSS_LIMIT:
            print(f"FAIL [{r.host}] resident memory grew {100 * r.rss_growth:.2f} % after warm-up "
                  f"(limit {100 * RSS_LIMIT:.0f} %)")
            bad += 1
        bad += len(r.failures)
    for r in reports:
        print(r.summary())
    print("OK" if not bad else f"{bad} problem(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    _paths()
    sys.exit(main())
