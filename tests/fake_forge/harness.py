"""Test harness over the fake Forge: a model, LoRA files, the real script, and reference results.

References are computed the slow, obvious way: a deep copy of the model with one LoRA
merged into its weights by the fake loader's merge (what Forge's built-in LoRA does),
run through the same ``calc_cond_uncond_batch``.
"""

from __future__ import annotations

import copy
import importlib.util
import itertools
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loratorio.fusion import method_options
from loratorio.routing import attached
from loratorio.settings import Settings

from . import install
from .forks import accepts, install_fork

ROOT = Path(__file__).resolve().parents[2]
_counter = itertools.count()


def reset_fake_state(lora_dir) -> None:
    import extra_networks_lora
    import networks
    from backend import memory_management
    from backend.sampling import sampling_function
    from backend.text_processing import classic_engine
    from modules import errors, extra_networks, shared

    memory_management.FREE_MEMORY = float(1 << 40)
    memory_management.LOADS.clear()
    sampling_function.CALLS.clear()
    classic_engine.last_extra_generation_params = {}
    errors.REPORTED.clear()
    extra_networks.extra_network_registry.clear()
    extra_networks.register_extra_network(extra_networks_lora.ExtraNetworkLora())
    networks.available_networks.clear()
    networks.available_network_aliases.clear()
    networks.loaded_networks.clear()
    networks.LOADS.clear()
    shared.cmd_opts.lora_dir = str(lora_dir)
    shared.state.interrupted = shared.state.skipped = False
    shared.opts.use_old_scheduling = False
    shared.sd_model = None


@dataclass
class Env:
    kind: str
    engine: object
    lora_dir: Path
    script: object = None
    files: dict = field(default_factory=dict)
    seed: int = 0
    engine_kwargs: dict = field(default_factory=dict)

    # -- LoRA files ------------------------------------------------------------------------

    def unet_layers(self, include=None, exclude=()):
        """kohya layer name -> weight shape for the UNet/DiT's Linear/Conv layers (by weight, not class)."""
        net = self.engine.forge_objects.unet.model.diffusion_model
        out = {}
        for name, module in net.named_modules():
            w = getattr(module, "weight", None)
            if not isinstance(w, torch.Tensor) or w.dim() not in (2, 4) or isinstance(module, torch.nn.Embedding):
                continue
            if include is not None and not any(s in name for s in include):
                continue
            if any(s in name for s in exclude):
                continue
            out["lora_unet_" + name.replace(".", "_")] = tuple(w.shape)
        return out

    def te_layers(self, encoder="clip_l", prefix=None, include=("mlp.fc1", "self_attn.q_proj")):
        enc = self.engine.text_encoders[encoder]
        out = {}
        for name, module in enc.named_modules():
            w = getattr(module, "weight", None)
            if not isinstance(w, torch.Tensor) or w.dim() != 2 or isinstance(module, torch.nn.Embedding):
                continue
            if include is not None and not any(s in name for s in include):
                continue
            inner = name[len("transformer."):].replace(".", "_")
            default = "lora_te_" if encoder in ("clip_l", "clip_g") else "lora_te2_"
            out[(prefix or default) + inner] = tuple(w.shape)
        return out

    def write(self, name, shapes, **kwargs):
        from lora_files import write_lora

        path = self.lora_dir / f"{name}.safetensors"
        sd = write_lora(path, shapes, **kwargs)
        self.files[name] = path
        import networks

        networks.list_available_networks()
        return sd

    def write_raw(self, name, tensors):
        from lora_files import write_raw

        path = self.lora_dir / f"{name}.safetensors"
        write_raw(path, tensors)
        self.files[name] = path
        import networks

        networks.list_available_networks()

    # -- generations -----------------------------------------------------------------------

    def processing(self, prompt, settings=None, *, img2img=False, **kwargs):
        from modules import processing, scripts

        runner = None
        script_args = []
        if self.script is not None:
            runner = scripts.ScriptRunner([self.script])
            script_args = [settings] if settings is not None else [{"enabled": False}]
            self.script.args_from, self.script.args_to = 0, len(script_args)
        cls = processing.StableDiffusionProcessingImg2Img if img2img else processing.StableDiffusionProcessingTxt2Img
        kwargs.setdefault("width", 32)
        kwargs.setdefault("height", 32)
        kwargs.setdefault("steps", 3)
        return cls(self.engine, prompt=prompt, scripts=runner, script_args=script_args, **kwargs)

    def run(self, prompt, settings=None, **kwargs):
        from modules import processing

        p = self.processing(prompt, settings, **kwargs)
        return p, processing.process_images(p)

    # -- state checks ----------------------------------------------------------------------

    def weights(self):
        """Every parameter and buffer of the UNet/DiT and the text encoders with no LoRA loaded, cloned.

        Loading the unpatched patchers first restores what the built-in LoRA merged (as
        Forge does at the next load), so what remains is what anything else wrote.
        """
        self.engine.forge_objects_original.unet.refresh_loras()
        self.engine.forge_objects_original.clip.patcher.refresh_loras()
        out = {}
        for prefix, module in (("unet.", self.engine.forge_objects_original.unet.model),
                               ("te.", self.engine.text_encoders)):
            for k, v in module.state_dict().items():
                out[prefix + k] = v.detach().clone()
        return out

    def hooks(self):
        """Forward hooks / pre-hooks and instance forwards left on any module of the model."""
        count = 0
        for module in itertools.chain(self.engine.forge_objects_original.unet.model.modules(),
                                      self.engine.text_encoders.modules()):
            count += len(module._forward_hooks) + len(module._forward_pre_hooks) + attached(module)
        return count


def load_script():
    """A fresh instance of the real ``scripts/loratorio.py`` (imported under a unique name)."""
    name = f"loratorio_script_{next(_counter)}"
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / "loratorio.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    script = module.LoratorioScript()
    script.alwayson = True
    return module, script


def make_env(monkeypatch, tmp_path, kind="sd15", seed=0, with_script=True, fork="forge", **engine_kwargs) -> Env:
    """A fake Forge with a model and the script; ``fork`` lays a fork's protocol over it (:mod:`.forks`)."""
    install(monkeypatch)
    lora_dir = tmp_path / "Lora"
    lora_dir.mkdir(exist_ok=True)
    reset_fake_state(lora_dir)
    install_fork(monkeypatch, fork)
    from backend.diffusion_engine.engines import FakeEngine
    from modules import shared

    engine = FakeEngine(kind, seed=seed, **engine_kwargs)
    shared.sd_model = engine
    env = Env(kind, engine, lora_dir, seed=seed, engine_kwargs=dict(engine_kwargs))
    if with_script:
        module, script = load_script()
        monkeypatch.setitem(sys.modules, module.__name__, module)
        env.script = script
        env.script_module = module
    from loratorio import host_forge

    host_forge.CACHE.clear()
    return env


# -- references ----------------------------------------------------------------------------


def merged_copy(env: Env, lora_names_mults):
    """(KModel copy, text-encoder copy) with the given LoRAs merged at ``(name, te, unet)`` multipliers."""
    from backend.patcher.lora import LoraLoader, load_lora, model_lora_keys_clip, model_lora_keys_unet
    from backend.utils import load_torch_file

    model = copy.deepcopy(env.engine.forge_objects_original.unet.model)
    te = copy.deepcopy(env.engine.text_encoders)
    for m in (model, te):
        m.lora_loader = LoraLoader(m)
    unet_patches, te_patches = {}, {}
    for name, te_mult, unet_mult in lora_names_mults:
        sd = load_torch_file(str(env.files[name]))
        pu, rest = load_lora(sd, model_lora_keys_unet(model, {}))
        pt, _ = load_lora(rest, model_lora_keys_clip(te, {}))
        unet_patches[(name, unet_mult, 1.0, False)] = _by_key(pu, unet_mult)
        te_patches[(name, te_mult, 1.0, False)] = _by_key(pt, te_mult)
    model.lora_loader.refresh(unet_patches)
    te.lora_loader.refresh(te_patches)
    return model, te


def _by_key(patches, strength):
    out = {}
    for k, v in patches.items():
        key, offset, fn = (k, None, None) if isinstance(k, str) else (k[0], k[1], k[2] if len(k) > 2 else None)
        out.setdefault(key, []).append([strength, v, 1.0, offset, fn])
    return out


# -- reference generation --------------------------------------------------------------------


def merged_engine(env: Env, loras):
    """A second engine with the same weights and ``loras`` ``[(name, te, unet), ...]`` merged (the built-in's way)."""
    from backend.diffusion_engine.engines import FakeEngine
    from backend.patcher.lora import load_lora, model_lora_keys_clip, model_lora_keys_unet
    from backend.utils import load_torch_file

    engine = FakeEngine(env.kind, seed=env.seed, **env.engine_kwargs)
    unet = engine.forge_objects.unet
    clip = engine.forge_objects.clip
    for name, te_mult, unet_mult in loras:
        sd = load_torch_file(str(env.files[name]))
        pu, rest = load_lora(sd, model_lora_keys_unet(unet.model, {}))
        pt, _ = load_lora(rest, model_lora_keys_clip(clip.cond_stage_model, {}))
        unet = unet.clone()
        unet.add_patches(filename=name, patches=pu, strength_patch=unet_mult)
        clip = clip.clone()
        clip.add_patches(filename=name, patches=pt, strength_patch=te_mult)
    unet.refresh_loras()
    clip.patcher.refresh_loras()
    engine.forge_objects.unet, engine.forge_objects.clip = unet, clip
    return engine


def reference_run(env: Env, prompt, branches, *, negative_prompt="", steps=3, cfg_scale=7.0, width=32, height=32,
                  batch_size=1, seed=0, recenter=None, temperature_scale=10.0, patch_size=2, top_k=0, merged=(),
                  sampler="Euler", text_encoder_per_branch=True, control=None, distilled_cfg_scale=3.5,
                  concat=None, method=None):
    """Final latents of a generation computed the obvious way.

    Each step: base predictions from the plain model (with ``merged`` LoRAs), each branch's
    from a separate model with its LoRA merged (and its own text encoder), fused with
    :func:`loratorio.fusion.compose`, then Forge's CFG and the sampler update.
    ``branches``: ``[(name, te, unet), ...]``. ``recenter`` and ``method`` default to the
    shipped settings' (:class:`loratorio.settings.Settings`).
    """
    defaults = Settings()
    recenter = defaults.recenter if recenter is None else recenter
    method = defaults.method if method is None else method
    from backend.sampling.condition import Condition, compile_conditions, compile_weighted_conditions
    from backend.sampling.sampling_function import calc_cond_uncond_batch
    from modules import extra_networks, prompt_parser, sd_samplers

    from loratorio.fusion import compose

    base = merged_engine(env, list(merged))
    engines = [merged_engine(env, [*merged, b]) for b in branches]
    texts, _ = extra_networks.parse_prompts([prompt] * batch_size)
    config = sd_samplers.find_sampler_config(sampler)
    total = config.total_steps(steps)
    distilled = ({"distilled_cfg_scale": distilled_cfg_scale}
                 if accepts(prompt_parser.SdConditioning.__init__, "distilled_cfg_scale") else {})
    pos = prompt_parser.SdConditioning(texts, width=width, height=height, **distilled)
    neg = prompt_parser.SdConditioning([negative_prompt] * batch_size, width=width, height=height,
                                       is_negative_prompt=True, **distilled)

    def conds(engine):
        c = prompt_parser.get_multicond_learned_conditioning(engine, pos, total)
        uc = prompt_parser.get_learned_conditioning(engine, neg, total) if cfg_scale != 1 else None
        return c, uc

    base_texts = conds(base)
    branch_texts = [conds(e) if text_encoder_per_branch else base_texts for e in engines]
    # method "joint": the merged row, every branch's LoRA (UNet and text encoder) applied at once
    joint = method_options(method).get("joint", 0) > 0 and len(branches) > 1
    merged_all = merged_engine(env, [*merged, *branches]) if joint else None
    merged_texts = (conds(merged_all) if text_encoder_per_branch else base_texts) if joint else None
    sampler_obj = sd_samplers.create_sampler(sampler, base)
    sigmas = sampler_obj.sigmas(steps)
    gens = [torch.Generator().manual_seed(seed + i) for i in range(batch_size)]
    latent = base.forge_objects.vae.latent_channels
    x = torch.stack([torch.randn(latent, height // 8, width // 8, generator=g) for g in gens])
    predictor = base.forge_objects.unet.model.predictor
    x = predictor.noise_scaling(sigmas[0], x, torch.zeros_like(x))
    calls = [0]

    def predict(engine, texts, xx, sigma):
        c, uc = texts
        composition, tensor = prompt_parser.reconstruct_multicond_batch(c, calls[0])
        cond = compile_weighted_conditions(tensor, composition)
        uncond = compile_conditions(prompt_parser.reconstruct_cond_batch(uc, calls[0])) if uc is not None else None
        for part in cond + (uncond or []):
            if control is not None:
                part["control"] = control
            if concat is not None:
                part["model_conds"]["c_concat"] = Condition(concat)
        return calc_cond_uncond_batch(engine.forge_objects.unet.model, cond, uncond, xx, sigma, {}), cond

    def denoise(xx, s, step):
        sigma = s * xx.new_ones(xx.shape[0])
        (cp, up), cond = predict(base, base_texts, xx, sigma)
        lora = [predict(e, t, xx, sigma)[0] for e, t in zip(engines, branch_texts)]
        has_uncond = cfg_scale != 1
        strength = sum(part.get("strength", 1) for part in cond)
        scale = cfg_scale * strength if abs(strength - 1.0) > 1e-9 else cfg_scale
        calls[0] += 1
        if not lora:
            return cp if up is None else up + (cp - up) * scale
        extra = {}
        if joint:
            mc, mu = predict(merged_all, merged_texts, xx, sigma)[0]
            extra = {"merged_cond": mc, "merged_uncond": mu if has_uncond and recenter > 0 else None}
        res = compose(cp, torch.stack([c for c, _ in lora]),
                      up if has_uncond else None,
                      torch.stack([u for _, u in lora]) if has_uncond and recenter > 0 else None,
                      step=step, x=xx, patch_size=patch_size, temperature_scale=temperature_scale,
                      recenter=recenter if has_uncond else 0.0, top_k=top_k if 0 < top_k < len(branches) else 0,
                      **method_options(method), **extra)
        u = res.uncond if has_uncond else up
        return res.cond if u is None else u + (res.cond - u) * scale  # None: reForge at CFG 1

    second_order = config.options.get("second_order", False)
    for i in range(steps):
        s, s_next = sigmas[i], sigmas[i + 1]
        d = (x - denoise(x, s, i)) / s
        if second_order and s_next > 0:
            x2 = x + d * (s_next - s)
            d2 = (x2 - denoise(x2, s_next, i)) / s_next
            x = x + (d + d2) / 2 * (s_next - s)
        else:
            x = x + d * (s_next - s)
    return x
