"""Fake of ``backend/sampling/sampling_function.py``: the CFG step and the batched model call.

Behaviour reproduced (line numbers in Forge's file):

- every cond part and the uncond become one *chunk* each; chunks that can be
  concatenated run in one model call, in **reversed** order, so cond + uncond run as
  ``[uncond rows, cond rows]`` and ``cond_or_uncond == [1, 0]`` (``:164-187, 222-231``);
- when ``model.memory_required`` of all chunks exceeds the free memory, fewer chunks go
  in one call (``:208-213``), e.g. ``[1]`` and then ``[0]``;
- ``transformer_options`` gets ``cond_or_uncond``, ``sigmas``, ``cond_mark``,
  ``cond_indices`` and ``uncond_indices`` (``:253-257``); a ControlNet in the conds computes its control for
  the concatenated input before the model call (``:261-268``);
- ``model_options['model_function_wrapper'](apply_model, {input, timestep, c,
  cond_or_uncond})`` replaces the plain call when present (``:270-273``);
- outputs are accumulated with ``mult`` (AND strength) and divided by the summed
  ``mult`` (``:276-288``).
"""

from __future__ import annotations

import math
from collections import namedtuple

import torch

from .. import memory_management

COND, UNCOND = 0, 1
_Chunk = namedtuple("_Chunk", ["input_x", "mult", "conditioning", "control"])
CALLS: list[dict] = []  # every model call: rows and cond_or_uncond (for tests)
# Where the Forge forks' samplers differ (set per test by ``tests.fake_forge.forks``):
# - ``uuids``: reForge marks each chunk of a call with its cond's uuid in ``transformer_options["uuids"]``
#   (its hooks group rows by them) and has no ``cond_mark`` / indices (``samplers.py:322-324``);
# - ``uncond_none``: reForge passes None, not zeros, for the uncond prediction it did not compute;
# - ``post_cfg_scale``: Neo, Classic and reForge hand the post-CFG functions the CFG scale.
PROTOCOL = {"uuids": False, "uncond_none": False, "post_cfg_scale": False}


def _prepare(cond, x_in):
    mult = torch.ones_like(x_in) * cond.get("strength", 1.0)
    conditioning = {k: v.process_cond(batch_size=x_in.shape[0], device=x_in.device)
                    for k, v in cond["model_conds"].items()}
    return _Chunk(x_in, mult, conditioning, cond.get("control"))


def _compatible(a, b):
    if a.input_x.shape != b.input_x.shape:
        return False
    if (a.control is None) != (b.control is None) or (a.control is not None and a.control is not b.control):
        return False
    if a.conditioning.keys() != b.conditioning.keys():
        return False
    return all(a.conditioning[k].can_concat(b.conditioning[k]) for k in a.conditioning)


def _cat_conditioning(items):
    keys = items[0].keys()
    return {k: items[0][k].concat([it[k] for it in items[1:]]) for k in keys}


def compute_cond_mark(cond_or_uncond, sigmas):
    """Per row of the call, the mark of its chunk (0 cond, 1 uncond), as a tensor like ``sigmas`` (``:129-137``)."""
    per = int(sigmas.shape[0])
    return torch.tensor([mark for mark in cond_or_uncond for _ in range(per)]).to(sigmas)


def compute_cond_indices(cond_or_uncond, sigmas):
    """Rows of the cond chunks and of the uncond chunks of the call (``:140-151``)."""
    per = int(sigmas.shape[0])
    cond = [i * per + r for i, k in enumerate(cond_or_uncond) if k == COND for r in range(per)]
    uncond = [i * per + r for i, k in enumerate(cond_or_uncond) if k != COND for r in range(per)]
    return cond, uncond


def calc_cond_uncond_batch(model, cond, uncond, x_in, timestep, model_options):
    out_cond = torch.zeros_like(x_in)
    count_cond = torch.ones_like(x_in) * 1e-37
    out_uncond = torch.zeros_like(x_in)
    count_uncond = torch.ones_like(x_in) * 1e-37

    pending = [(_prepare(c, x_in), COND) for c in cond]
    if uncond is not None:
        pending += [(_prepare(c, x_in), UNCOND) for c in uncond]

    while pending:
        first = pending[0][0]
        candidates = [i for i, (chunk, _) in enumerate(pending) if _compatible(chunk, first)]
        candidates.reverse()
        chosen = candidates[:1]
        free = memory_management.get_free_memory(x_in.device)
        for parts in range(1, len(candidates) + 1):
            take = candidates[:len(candidates) // parts]
            shape = [len(take) * first.input_x.shape[0], *first.input_x.shape[1:]]
            if model.memory_required(shape) < free:
                chosen = take
                break

        picked = [pending.pop(i) for i in chosen]  # indices are descending, so pops stay valid
        chunks = [c for c, _ in picked]
        cond_or_uncond = [kind for _, kind in picked]
        n = len(chunks)
        input_x = torch.cat([c.input_x for c in chunks])
        c = _cat_conditioning([ch.conditioning for ch in chunks])
        timestep_ = torch.cat([timestep] * n)

        transformer_options = dict(model_options.get("transformer_options", {}))
        transformer_options["cond_or_uncond"] = cond_or_uncond[:]
        transformer_options["sigmas"] = timestep
        apply_model = model.apply_model
        if PROTOCOL["uuids"]:
            transformer_options["uuids"] = [f"{'cond' if kind == COND else 'uncond'}-{id(chunk.conditioning)}"
                                            for chunk, kind in picked]
            apply_model = _uuid_checked(model.apply_model)
        else:
            transformer_options["cond_mark"] = compute_cond_mark(cond_or_uncond, timestep)
            transformer_options["cond_indices"], transformer_options["uncond_indices"] = compute_cond_indices(
                cond_or_uncond, timestep)
        c["transformer_options"] = transformer_options

        control = chunks[0].control
        if control is not None:
            c["control"] = control.get_control(input_x, timestep_, dict(c), n)

        CALLS.append({"rows": input_x.shape[0], "cond_or_uncond": cond_or_uncond[:], "shape": tuple(input_x.shape)})
        if "model_function_wrapper" in model_options:
            output = model_options["model_function_wrapper"](
                apply_model, {"input": input_x, "timestep": timestep_, "c": c, "cond_or_uncond": cond_or_uncond})
        else:
            output = apply_model(input_x, timestep_, **c)
        output = output.chunk(n)

        for o, (chunk, kind) in enumerate(picked):
            if kind == COND:
                out_cond += output[o] * chunk.mult
                count_cond += chunk.mult
            else:
                out_uncond += output[o] * chunk.mult
                count_uncond += chunk.mult

    uncond_pred = None if uncond is None and PROTOCOL["uncond_none"] else out_uncond / count_uncond
    return out_cond / count_cond, uncond_pred


def _uuid_checked(apply_model):
    """reForge's model call groups rows by chunk uuid: one uuid per chunk of the call's rows."""

    def apply(x, t, **c):
        options = c.get("transformer_options", {})
        chunks = len(options.get("cond_or_uncond", []))
        if len(options.get("uuids", [])) != chunks or x.shape[0] % max(1, chunks):
            raise RuntimeError(f"{len(options.get('uuids', []))} uuids for {chunks} chunks of {x.shape[0]} rows")
        return apply_model(x, t, **c)

    return apply


def sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options=None, seed=None,
                            return_full=False):
    model_options = model_options if model_options is not None else {}
    edit_strength = sum(item.get("strength", 1) for item in cond)
    if math.isclose(cond_scale, 1.0) and not model_options.get("disable_cfg1_optimization", False):
        uncond_ = None
    else:
        uncond_ = uncond

    for fn in model_options.get("sampler_pre_cfg_function", []):
        model, cond, uncond_, x, timestep, model_options = fn(model, cond, uncond_, x, timestep, model_options)

    cond_pred, uncond_pred = calc_cond_uncond_batch(model, cond, uncond_, x, timestep, model_options)

    if uncond_pred is None:
        cfg_result = cond_pred
    elif "sampler_cfg_function" in model_options:
        args = {"cond": x - cond_pred, "uncond": x - uncond_pred, "cond_scale": cond_scale, "timestep": timestep,
                "input": x, "sigma": timestep, "cond_denoised": cond_pred, "uncond_denoised": uncond_pred,
                "model": model, "model_options": model_options}
        cfg_result = x - model_options["sampler_cfg_function"](args)
    elif not math.isclose(edit_strength, 1.0):
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale * edit_strength
    else:
        cfg_result = uncond_pred + (cond_pred - uncond_pred) * cond_scale

    for fn in model_options.get("sampler_post_cfg_function", []):
        args = {"denoised": cfg_result, "cond": cond, "uncond": uncond, "model": model,
                "uncond_denoised": uncond_pred, "cond_denoised": cond_pred, "sigma": timestep,
                "model_options": model_options, "input": x}
        if PROTOCOL["post_cfg_scale"]:
            args["cond_scale"] = cond_scale
        cfg_result = fn(args)

    if return_full:
        return cfg_result, cond_pred, uncond_pred
    return cfg_result


def sampling_function(self, denoiser_params, cond_scale, cond_composition):
    from .condition import Condition, compile_conditions, compile_weighted_conditions

    unet_patcher = self.inner_model.inner_model.forge_objects.unet
    model = unet_patcher.model
    control = unet_patcher.controlnet_linked_list
    x = denoiser_params.x
    timestep = denoiser_params.sigma
    uncond = compile_conditions(denoiser_params.text_uncond)
    cond = compile_weighted_conditions(denoiser_params.text_cond, cond_composition)
    model_options = unet_patcher.model_options
    seed = self.p.seeds[0]

    image_cond = unet_patcher.extra_concat_condition
    if image_cond is None:
        image_cond = denoiser_params.image_cond
    if isinstance(image_cond, torch.Tensor) and image_cond.shape[0] == x.shape[0] \
            and image_cond.shape[2:] == x.shape[2:]:
        for part in (uncond or []) + cond:
            part["model_conds"]["c_concat"] = Condition(image_cond)

    if control is not None:
        for part in (uncond or []) + cond:
            part["control"] = control

    for modifier in model_options.get("conditioning_modifiers", []):
        model, x, timestep, uncond, cond, cond_scale, model_options, seed = modifier(
            model, x, timestep, uncond, cond, cond_scale, model_options, seed)

    return sampling_function_inner(model, x, timestep, uncond, cond, cond_scale, model_options, seed,
                                   return_full=True)


def sampling_prepare(unet, x):
    b, c, h, w = x.shape
    estimate = unet.model_options.get("memory_peak_estimation_modifier", unet.memory_required)
    models = [unet, *unet.extra_model_patchers_during_sampling]
    memory_management.load_models_gpu(models, memory_required=estimate([b * 2, c, h, w]),
                                      hard_memory_preservation=unet.extra_preserved_memory_during_sampling)


def sampling_cleanup(unet):
    return None
