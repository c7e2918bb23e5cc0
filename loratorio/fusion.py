"""The LoRAtorio composition step: the whole method in one place.

One denoising step receives the base model's predictions and each composed LoRA's
predictions for the same noisy latent ``x``. Patch by patch, the LoRA whose prediction
diverges most from the base owns the patch (SoftMin of cosine similarity); the
conditional predictions are mixed with those weights and the unconditional ones are
re-centred toward the base. The host's own classifier-free guidance then runs on the
returned ``(cond, uncond)`` pair unchanged.

The steps, numbered as the rest of the code cites them:

1. descriptor: the noise-like residual averaged over channels, split into ``p x p``
   patches; edge patches of sizes that are not multiples of ``p`` use only their real
   pixels (zero padding of both vectors gives exactly that);
2. similarity: ``S[i, b, patch] = cos(base, lora_i)`` with norms clamped at 1e-8;
3. temperature ``tau_k = 1 / (c * k)`` with ``k`` the 0-based sampling step of this pass
   (``k = 0``: infinite temperature, uniform weights);
4. SoftMin over the LoRAs per patch, ``w_i = softmax(-S_i / tau)``;
5. top-k gating: with ``0 < top_k < N`` only the ``top_k`` least similar LoRAs of a
   patch take part, the others get weight 0;
6. nearest upsampling of the patch weights to pixels, broadcast over channels;
7. ``cond = sum_i w_i * lora_cond_i``;
8. ``uncond = lambda * sum_i w_i * lora_uncond_i + (1 - lambda) * base_uncond``;
9. (host) ``uncond + s * (cond - uncond)``;
10. guidance-distilled models have no unconditional pass: only 1-7 apply.

Beyond the paper's step (keyword options of :func:`compose`; the defaults are the
paper's step exactly):

- ``descriptor = "channels"`` (step 1): patch vectors keep the channels instead of
  averaging them, so a change carried by the balance between channels (a hue) counts;
- ``descriptor = "activity"`` (steps 1-2): the "similarity" of LoRA ``i`` in a patch is
  minus the size of its difference from the base there, relative to its mean size over
  the image: ``-|lora_i - base|_patch / mean(|lora_i - base|)``. It depends only on
  differences of predictions, so it is the same in both prediction forms (differences
  of denoised estimates are differences of noise predictions times ``-sigma``);
- ``centred = True`` (after step 2): each LoRA's similarity minus its mean over the
  image's patches, so a LoRA that differs from the base everywhere (a style, a
  background) no longer wins every patch: each LoRA wins where it differs more than it
  usually does;
- ``mix = "resolve"`` (steps 7-8): ``base + sum_i g_i (lora_i - base)``; a LoRA keeps
  its whole difference (``g_i = 1``) unless another LoRA pushes the same pixel the
  opposite way and owns it more by the SoftMin weights:
  ``g_i = 1 - max_j conflict_ij * w_j / (w_i + w_j)``, with ``conflict_ij`` tested per
  pixel (the cosine over the channels of the two LoRAs' differences there) and ``w``
  the patch weights (``conflict = "patch"``: the cosine over the whole patch, for
  comparison). LoRAs that change different things in the same patch keep all of
  their changes, as in a merge; ownership (the paper's idea) only settles conflicts.
  One LoRA alone gives its own prediction;
- ``joint`` (with a delta mix, steps 7-8): adds ``joint * (merged - base - sum_i (lora_i -
  base))``, where ``merged`` is the prediction with every evaluated LoRA applied at once
  (what a merge computes). That term holds what the LoRAs do to each other's effects
  (clothing drawn on the character's body rather than on a generic figure), which
  isolated branches cannot see. ``joint = 0.5`` is the plain average of the gated branch
  composition and the merged prediction with the same gated-out changes removed:
  ``0.5 (base + sum g_i d_i) + 0.5 (merged - sum (1 - g_i) d_i)``;
- ``mix = "delta"``: the same form with ``g_i = w_i / max_j w_j`` (the patch's owner in
  full, the others in proportion to their SoftMin weight);
- ``mix = "sum"``: every (top-k selected) LoRA's difference in full, the output-space
  counterpart of a merge computed on isolated branches.

The gates of the delta mixes need not sum to one. :data:`METHODS` names the option sets
a user picks from: ``paper`` (none of them), ``resolve`` and ``joint`` (``resolve`` with
``joint = 0.5``; the default: see docs/method.md and docs/quality.md for the evidence).
``joint`` needs one more prediction per step and side (the merged row).

For the delta mixes the unconditional side is ``base_uncond + lambda * sum_i g_i
(lora_uncond_i - base_uncond)``; with ``lambda = 1`` the negative prediction carries the
LoRAs' unconditional change with the same gates, so guidance amplifies only what the
prompt adds (as with merged weights), not the LoRAs' whole change. Every mix is affine
(its coefficients on the predictions sum to one per pixel, ``1 - sum g`` going to the
base), so mixing denoised estimates and mixing noise predictions give the same step.

Prediction forms. Hosts give either *denoised* estimates (k-diffusion and Forge
samplers) or *noise* predictions (eps or velocity, A1111's DDIM/PLMS/UniPC). With ``x``
given, predictions are treated as denoised and the similarity uses the residual
``x - prediction`` (= sigma * eps; cosine ignores the positive factor sigma). Without
``x`` they are noise-like and compared directly. Mixing happens in the form given:
every mix is affine, so both forms give the same step.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["CONFLICTS", "DESCRIPTORS", "METHODS", "MIXES", "Composition", "compose", "method_options",
           "patch_similarity", "softmin_weights", "temperature"]

_NORM_EPS = 1e-8
#: Step-1 descriptors: the paper's channel mean, channels kept, relative difference size.
DESCRIPTORS = ("mean", "channels", "activity")
#: Steps 7-8: the paper's convex mix, gated differences, all differences in full.
MIXES = ("convex", "delta", "sum", "resolve")
#: Where ``mix = "resolve"`` tests for opposite pushes: at each latent pixel, or over each patch.
CONFLICTS = ("pixel", "patch")

#: Named composition methods: the :func:`compose` options each one sets. ``paper`` is
#: the step of docs/method.md exactly.
METHODS: dict[str, dict] = {
    "paper": {},
    "resolve": {"descriptor": "activity", "mix": "resolve"},
    "joint": {"descriptor": "activity", "mix": "resolve", "joint": 0.5},
}


def method_options(method: str) -> dict:
    """The :func:`compose` keyword options of a named method (a copy)."""
    if method not in METHODS:
        raise ValueError(f"unknown composition method {method!r}; known: {', '.join(METHODS)}")
    return dict(METHODS[method])


@dataclass(frozen=True)
class Composition:
    """Result of one composition step.

    ``cond`` and ``uncond`` are in the prediction form and dtype that were given
    (``uncond`` is None when no base unconditional prediction was given); ``weights``
    holds the per-pixel LoRA weights ``[N, B, 1, H, W]`` in float32: for the convex mix
    they sum to one over ``N`` at every pixel, for the delta mixes they are the gates in
    [0, 1] (how much of each LoRA's difference from the base acts there).
    """

    cond: torch.Tensor
    uncond: torch.Tensor | None
    weights: torch.Tensor


def temperature(step: int, temperature_scale: float) -> float:
    """Step 3: ``tau_k = 1 / (c * k)``; ``math.inf`` at ``k = 0`` (uniform weights)."""
    if step == 0:
        return math.inf
    return 1.0 / (float(temperature_scale) * step)


def _channel_residual(pred: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
    """Noise-like residual with the channels kept, in float32 (``[..., C, H, W]``)."""
    pred = pred.float()
    return x.float() - pred if x is not None else pred


def _channel_mean_residual(pred: torch.Tensor, x: torch.Tensor | None) -> torch.Tensor:
    """Noise-like residual averaged over channels, in float32 (``[..., H, W]``)."""
    return _channel_residual(pred, x).mean(dim=-3)


def _channel_patch_vectors(desc: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[..., C, H, W]`` -> ``[..., Ph, Pw, C*p*p]`` (channels kept, zero padded like :func:`_patch_vectors`)."""
    vec = _patch_vectors(desc, patch_size)  # [..., C, Ph, Pw, p*p]
    return vec.movedim(-4, -2).flatten(-2)


def _patch_sums(values: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[..., H, W]`` -> ``[..., Ph, Pw]``: the sum over each patch (zero padded at the bottom/right edge).

    Patch statistics as sums, without building the patch vectors (a copy of the whole tensor).
    """
    h, w = values.shape[-2:]
    ph, pw = -(-h // patch_size), -(-w // patch_size)
    if ph * patch_size != h or pw * patch_size != w:
        values = F.pad(values, (0, pw * patch_size - w, 0, ph * patch_size - h))
    lead = values.shape[:-2]
    return values.reshape(*lead, ph, patch_size, pw, patch_size).sum(dim=(-3, -1))


def _pixel_gram(base: torch.Tensor, lora: torch.Tensor) -> torch.Tensor:
    """``[N, N, B, H, W]``: dot products over the channels of the LoRAs' differences from the base at each
    pixel, in float32. Its diagonal holds each LoRA's squared difference size per pixel."""
    diff = lora.float() - base.float().unsqueeze(0)
    return (diff.unsqueeze(1) * diff.unsqueeze(0)).sum(dim=3)


def _difference_gram(base: torch.Tensor, lora: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[N, N, B, Ph, Pw]``: :func:`_pixel_gram` summed over each patch."""
    return _patch_sums(_pixel_gram(base, lora), patch_size)


def _activity_similarity(gram: torch.Tensor) -> torch.Tensor:
    """The ``activity`` descriptor from :func:`_difference_gram`: minus each LoRA's difference size per patch
    relative to its mean over the image, ``[N, B, Ph, Pw]``."""
    size = torch.diagonal(gram, dim1=0, dim2=1).movedim(-1, 0).clamp_min(0).sqrt()
    return -size / size.mean(dim=(-2, -1), keepdim=True).clamp_min(_NORM_EPS)


def _patch_vectors(desc: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[..., H, W]`` -> ``[..., Ph, Pw, p*p]``, zero padded at the bottom/right edge."""
    h, w = desc.shape[-2:]
    ph, pw = -(-h // patch_size), -(-w // patch_size)
    pad_h, pad_w = ph * patch_size - h, pw * patch_size - w
    if pad_h or pad_w:
        desc = F.pad(desc, (0, pad_w, 0, pad_h))
    lead = desc.shape[:-2]
    desc = desc.reshape(*lead, ph, patch_size, pw, patch_size)
    return desc.movedim(-3, -2).reshape(*lead, ph, pw, patch_size * patch_size)


def patch_similarity(
    base: torch.Tensor,
    lora: torch.Tensor,
    *,
    x: torch.Tensor | None = None,
    patch_size: int = 2,
    descriptor: str = "mean",
    centred: bool = False,
) -> torch.Tensor:
    """Steps 1-2: how similar each LoRA is to the base, per patch (lower = the LoRA owns it more).

    ``base`` is ``[B, C, H, W]`` and ``lora`` ``[N, B, C, H, W]``, both denoised
    estimates when ``x`` is given (the residual ``x - pred`` is compared) and noise-like
    otherwise. ``descriptor = "mean"`` is the paper's cosine of channel-averaged
    residuals, ``"channels"`` the cosine with channels kept, ``"activity"`` minus the
    LoRA's difference from the base relative to its image mean (form-independent; see
    the module docstring). ``centred`` subtracts each LoRA's mean over the image's
    patches. Returns float32 ``[N, B, Ph, Pw]`` with ``Ph = ceil(H / p)``.
    """
    return _similarity(base, lora, x, patch_size, descriptor, centred)


def _similarity(base, lora, x, patch_size: int, descriptor: str, centred: bool,
                gram: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`patch_similarity`; ``gram`` (from :func:`_difference_gram`) saves recomputing it for ``activity``."""
    if descriptor == "activity":
        sim = _activity_similarity(gram if gram is not None else _difference_gram(base, lora, patch_size))
    else:
        if descriptor == "channels":
            base_vec = _channel_patch_vectors(_channel_residual(base, x), patch_size)
            lora_vec = _channel_patch_vectors(_channel_residual(lora, x), patch_size)
        else:
            base_vec = _patch_vectors(_channel_mean_residual(base, x), patch_size)
            lora_vec = _patch_vectors(_channel_mean_residual(lora, x), patch_size)
        dot = (lora_vec * base_vec).sum(-1)
        base_norm = base_vec.norm(dim=-1).clamp_min(_NORM_EPS)
        lora_norm = lora_vec.norm(dim=-1).clamp_min(_NORM_EPS)
        sim = dot / (base_norm * lora_norm)
    if centred:
        sim = sim - sim.mean(dim=(-2, -1), keepdim=True)
    return sim


def softmin_weights(similarity: torch.Tensor, *, step: int, temperature_scale: float, top_k: int = 0) -> torch.Tensor:
    """Steps 3-5: SoftMin over dim 0 of ``similarity`` (``[N, ...]``), with top-k gating.

    Returns float32 weights of the same shape that sum to one over dim 0. At ``step`` 0
    the temperature is infinite and the (selected) LoRAs share a patch equally.
    """
    n = similarity.shape[0]
    # A non-finite similarity (a branch that produced NaN/inf) must not poison the
    # patch: treat it as "identical to the base", the least informative value.
    sim = torch.nan_to_num(similarity.float(), nan=1.0, posinf=1.0, neginf=-1.0)
    tau = temperature(step, temperature_scale)
    logits = torch.zeros_like(sim) if math.isinf(tau) else -sim / tau
    if 0 < top_k < n:
        # The k least similar LoRAs of each patch take part; ties break by LoRA order.
        keep = torch.topk(-sim, top_k, dim=0, largest=True, sorted=False).indices
        mask = torch.zeros_like(sim, dtype=torch.bool).scatter_(0, keep, True)
        logits = logits.masked_fill(~mask, -math.inf)
    return torch.softmax(logits, dim=0)


def _upsample(weights: torch.Tensor, patch_size: int, height: int, width: int) -> torch.Tensor:
    """Step 6: ``[N, B, Ph, Pw]`` -> ``[N, B, 1, H, W]`` (each pixel gets its patch's weight)."""
    if patch_size > 1:
        weights = weights.repeat_interleave(patch_size, dim=-2).repeat_interleave(patch_size, dim=-1)
    return weights[..., :height, :width].unsqueeze(2)


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_shape(name: str, tensor, shape: tuple[int, ...]) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {list(tensor.shape)}")


def _validate(base_cond, lora_cond, base_uncond, lora_uncond, step, x, patch_size, temperature_scale, recenter, top_k,
              descriptor="mean", mix="convex", conflict="pixel"):
    if not isinstance(base_cond, torch.Tensor) or base_cond.dim() != 4:
        shape = list(base_cond.shape) if isinstance(base_cond, torch.Tensor) else type(base_cond).__name__
        raise ValueError(f"base_cond must be a [B, C, H, W] tensor, got {shape}")
    if not isinstance(lora_cond, torch.Tensor) or lora_cond.dim() != 5:
        shape = list(lora_cond.shape) if isinstance(lora_cond, torch.Tensor) else type(lora_cond).__name__
        raise ValueError(f"lora_cond must be a [N, B, C, H, W] tensor, got {shape}")
    if lora_cond.shape[0] == 0:
        raise ValueError("lora_cond must hold at least one LoRA (N >= 1), got N = 0")
    if base_cond.shape[0] == 0:
        raise ValueError("base_cond must hold at least one batch row (B >= 1), got B = 0")
    _check_shape("lora_cond", lora_cond, (lora_cond.shape[0], *base_cond.shape))
    if base_uncond is not None:
        _check_shape("base_uncond", base_uncond, tuple(base_cond.shape))
    if lora_uncond is not None:
        if base_uncond is None:
            raise ValueError("lora_uncond was given without base_uncond; pass both or neither")
        _check_shape("lora_uncond", lora_uncond, tuple(lora_cond.shape))
    if x is not None:
        _check_shape("x", x, tuple(base_cond.shape))
    _check_int("step", step, 0)
    _check_int("patch_size", patch_size, 1)
    _check_int("top_k", top_k, 0)
    if isinstance(temperature_scale, bool) or not isinstance(temperature_scale, numbers.Real) or not (
        math.isfinite(temperature_scale) and temperature_scale > 0
    ):
        raise ValueError(f"temperature_scale must be a finite number > 0, got {temperature_scale!r}")
    if isinstance(recenter, bool) or not isinstance(recenter, numbers.Real) or not 0.0 <= recenter <= 1.0:
        raise ValueError(f"recenter must be a number in [0, 1], got {recenter!r}")
    if descriptor not in DESCRIPTORS:
        raise ValueError(f"descriptor must be one of {', '.join(DESCRIPTORS)}, got {descriptor!r}")
    if mix not in MIXES:
        raise ValueError(f"mix must be one of {', '.join(MIXES)}, got {mix!r}")
    if conflict not in CONFLICTS:
        raise ValueError(f"conflict must be one of {', '.join(CONFLICTS)}, got {conflict!r}")
    if base_uncond is not None and lora_uncond is None and recenter != 0:
        raise ValueError(f"lora_uncond is required when recenter > 0 (recenter = {recenter!r}); "
                         "pass it or set recenter = 0")


def _validate_joint(joint, mix: str, base_cond, lora_cond, merged_cond, merged_uncond, mixes_uncond: bool) -> float:
    """``joint`` as a float after checking it and the merged predictions it needs (0 when it has nothing to add)."""
    if isinstance(joint, bool) or not isinstance(joint, numbers.Real) or not 0.0 <= joint <= 1.0:
        raise ValueError(f"joint must be a number in [0, 1], got {joint!r}")
    if joint == 0 or lora_cond.shape[0] == 1:
        return 0.0  # one LoRA: the merged prediction is the branch's own, the term is zero
    if mix == "convex":
        raise ValueError("joint needs a delta mix (mix = 'resolve', 'delta' or 'sum'), got mix = 'convex'")
    if merged_cond is None:
        raise ValueError("joint > 0 needs merged_cond (every LoRA applied at once)")
    _check_shape("merged_cond", merged_cond, tuple(base_cond.shape))
    if mixes_uncond:
        if merged_uncond is None:
            raise ValueError("joint > 0 with a mixed uncond needs merged_uncond")
        _check_shape("merged_uncond", merged_uncond, tuple(base_cond.shape))
    return float(joint)


def _interaction(merged: torch.Tensor, base: torch.Tensor, loras: torch.Tensor) -> torch.Tensor:
    """``merged - base - sum_i (lora_i - base)`` in at least float32: what the LoRAs add to each other's effects."""
    dtype = torch.promote_types(base.dtype, torch.float32)
    base = base.to(dtype)
    return merged.to(dtype) - base - (loras.to(dtype) - base).sum(0)


def _mix(weights: torch.Tensor, preds: torch.Tensor) -> torch.Tensor:
    """Steps 7-8: ``sum_i w_i * pred_i`` (``[N, B, 1, H, W]`` x ``[N, B, C, H, W]``), at least float32."""
    dtype = torch.promote_types(preds.dtype, torch.float32)
    return (weights.to(dtype) * preds.to(dtype)).sum(0)


def _mix_delta(gates: torch.Tensor, base: torch.Tensor, preds: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """``base + strength * sum_i g_i (pred_i - base)``, at least float32; either prediction form (affine)."""
    dtype = torch.promote_types(preds.dtype, torch.float32)
    base = base.to(dtype)
    return base + strength * (gates.to(dtype) * (preds.to(dtype) - base)).sum(0)


def _conflict_gates(weights: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``resolve`` gates ``[N, B, H, W]``: a LoRA keeps its whole difference unless another LoRA pushes the
    same pixel the opposite way and owns it more (by the SoftMin ``weights``, ``[N, B, H, W]``: the patch
    weights brought to pixels).

    ``g_i = 1 - max_j conflict_ij * w_j / (w_i + w_j)`` with ``conflict_ij = max(0, -cos(d_i, d_j))`` of the
    LoRAs' differences from the base at the pixel (over the channels, from :func:`_pixel_gram`; the same in
    both prediction forms). The test is per pixel, not per patch: opposite pushes are a property of one
    place, and a patch sum mixes the pushes of neighbouring pixels (it can hide a conflict next to an
    agreement, or make one of two changes that sit side by side). Given patch weights and the patch
    sums of :func:`_difference_gram` instead, the same formula tests per patch (``conflict = "patch"``).
    """
    norm = torch.diagonal(gram, dim1=0, dim2=1).movedim(-1, 0).clamp_min(0).sqrt().clamp_min(_NORM_EPS)
    conflict = (-gram / (norm.unsqueeze(0) * norm.unsqueeze(1))).clamp_min(0)
    n = weights.shape[0]
    conflict = conflict * (1 - torch.eye(n, dtype=conflict.dtype, device=conflict.device))[:, :, None, None, None]
    share = weights.unsqueeze(0) / (weights.unsqueeze(0) + weights.unsqueeze(1)).clamp_min(
        torch.finfo(weights.dtype).tiny)  # [i, j]: w_j / (w_i + w_j)
    return 1 - (conflict * share).amax(dim=1)


def _resolve_gates(patch_weights: torch.Tensor, gram: torch.Tensor, per_pixel: bool, patch_size: int, top_k: int,
                   height: int, width: int) -> torch.Tensor:
    """The ``resolve`` gates at pixels, ``[N, B, 1, H, W]``, from the patch weights and the difference products
    ``gram``: per pixel (:func:`_pixel_gram`; the weights are brought to pixels first) or per patch
    (:func:`_difference_gram`; the gates are brought to pixels after)."""
    weights = _upsample(patch_weights, patch_size, height, width)[:, :, 0] if per_pixel else patch_weights
    gates = _conflict_gates(weights, gram)
    if 0 < top_k < weights.shape[0]:
        gates = gates * (weights > 0)  # step 5: only the selected LoRAs act
    return _upsample(gates, 1 if per_pixel else patch_size, height, width)


def _gates(weights: torch.Tensor, mix: str, top_k: int) -> torch.Tensor:
    """Delta-mix gates from the patch weights ``[N, B, Ph, Pw]`` (see the module docstring)."""
    if mix == "sum":
        if 0 < top_k < weights.shape[0]:
            return (weights > 0).float()
        return torch.ones_like(weights)
    return weights / weights.amax(dim=0, keepdim=True).clamp_min(torch.finfo(weights.dtype).tiny)


def compose(
    base_cond: torch.Tensor,
    lora_cond: torch.Tensor,
    base_uncond: torch.Tensor | None = None,
    lora_uncond: torch.Tensor | None = None,
    *,
    step: int,
    x: torch.Tensor | None = None,
    patch_size: int = 2,
    temperature_scale: float = 10.0,
    recenter: float = 0.5,
    top_k: int = 0,
    descriptor: str = "mean",
    centred: bool = False,
    mix: str = "convex",
    conflict: str = "pixel",
    joint: float = 0.0,
    merged_cond: torch.Tensor | None = None,
    merged_uncond: torch.Tensor | None = None,
) -> Composition:
    """Compose N LoRA branches for one denoising step (steps 1-8).

    ``base_cond``/``base_uncond`` are ``[B, C, H, W]``, ``lora_cond``/``lora_uncond``
    ``[N, B, C, H, W]``. With ``x`` (``[B, C, H, W]``) the predictions are denoised
    estimates, otherwise noise-like (eps or velocity). ``step`` is the 0-based sampling
    step of the current pass (second-order samplers pass the same step twice; a hires
    pass starts again at 0). ``lora_uncond`` may be None only when ``recenter == 0``;
    then the returned uncond is ``base_uncond`` itself. The similarity is computed in
    float32; ``cond``/``uncond`` come back in the input dtype.

    ``descriptor``, ``centred``, ``mix``, ``conflict`` and ``joint`` choose the steps beyond the paper
    (module docstring); their defaults give the paper's step exactly. ``joint > 0`` takes
    ``merged_cond`` (``[B, C, H, W]``, every LoRA of ``lora_cond`` applied at once, in the
    same form) and, where the uncond is mixed, ``merged_uncond``; with one LoRA the merged
    prediction is that LoRA's and may be left out.

    Raises ``ValueError`` naming the argument for wrong shapes, N = 0, ``patch_size < 1``,
    negative ``step``, ``temperature_scale <= 0``, ``recenter`` outside [0, 1],
    ``top_k < 0`` or an unknown ``descriptor`` / ``mix`` / ``conflict``.
    """
    _validate(base_cond, lora_cond, base_uncond, lora_uncond, step, x, patch_size, temperature_scale, recenter, top_k,
              descriptor, mix, conflict)
    joint = _validate_joint(joint, mix, base_cond, lora_cond, merged_cond, merged_uncond,
                            base_uncond is not None and recenter > 0)
    height, width = base_cond.shape[-2:]
    # the resolve gates and the activity descriptor (per patch) share the LoRAs' difference products
    per_pixel = mix == "resolve" and conflict == "pixel"
    per_patch = descriptor == "activity" or (mix == "resolve" and not per_pixel)
    pixel_gram = _pixel_gram(base_cond, lora_cond) if per_pixel or per_patch else None
    gram = _patch_sums(pixel_gram, patch_size) if per_patch else None
    similarity = _similarity(base_cond, lora_cond, x, patch_size, descriptor, bool(centred), gram)
    patch_weights = softmin_weights(similarity, step=step, temperature_scale=temperature_scale, top_k=top_k)
    if mix != "convex":
        if mix == "resolve":
            gates = _resolve_gates(patch_weights, pixel_gram if per_pixel else gram, per_pixel, patch_size, top_k,
                                   height, width)
        else:
            gates = _upsample(_gates(patch_weights, mix, top_k), patch_size, height, width)
        cond = _mix_delta(gates, base_cond, lora_cond)
        if joint:
            cond = cond + joint * _interaction(merged_cond, base_cond, lora_cond)
        cond = cond.to(base_cond.dtype)
        uncond = None
        if base_uncond is not None:
            if recenter == 0:
                uncond = base_uncond
            else:
                uncond = _mix_delta(gates, base_uncond, lora_uncond, recenter)
                if joint:
                    uncond = uncond + joint * recenter * _interaction(merged_uncond, base_uncond, lora_uncond)
                uncond = uncond.to(base_uncond.dtype)
        return Composition(cond=cond, uncond=uncond, weights=gates)
    weights = _upsample(patch_weights, patch_size, height, width)

    cond = _mix(weights, lora_cond).to(base_cond.dtype)
    uncond = None
    if base_uncond is not None:
        if recenter == 0:
            uncond = base_uncond
        else:
            mixed = _mix(weights, lora_uncond)
            base = base_uncond.to(mixed.dtype)
            uncond = (recenter * mixed + (1.0 - recenter) * base).to(base_uncond.dtype)
    return Composition(cond=cond, uncond=uncond, weights=weights)
