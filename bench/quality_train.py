"""Training of the mini-world's base model and of one LoRA per concept.

The base model sees only generic scenes (with stray trigger words that change
nothing), with the caption dropped to the null caption for a share of the batch so
that it has a real unconditional branch for classifier-free guidance. Each LoRA is
trained with the base frozen on images that contain its concept and nothing else
named: a narrow-domain adapter, the premise of the method. LoRAs are trained with the
same caption dropout, so their unconditional predictions drift toward their concept as
real narrow LoRAs' do.
"""

from __future__ import annotations

import copy
import time

import numpy as np
import torch

from bench.quality_model import LoRATrainer, TinyUNet, diffusion_loss, lora_targets
from bench.quality_world import VOCAB, base_batch, concept_batch


def _to_model_range(imgs: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(imgs) * 2 - 1


def train_base(steps: int, batch: int, seed: int, null_prob: float = 0.15, lr: float = 2e-3, log_every: int = 25):
    """Train :class:`TinyUNet` from scratch on generic scenes; returns the EMA model and the loss log."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    model = TinyUNet(VOCAB)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    log, window, t0 = [], [], time.time()
    for step in range(steps):
        imgs, caps = base_batch(batch, rng)
        loss = diffusion_loss(model, _to_model_range(imgs), torch.from_numpy(caps), gen, null_prob)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - decay)
        window.append(loss.item())
        if (step + 1) % log_every == 0 or step == steps - 1:
            log.append((step + 1, float(np.mean(window))))
            window = []
    ema.eval()
    return ema, {"loss": log, "seconds": time.time() - t0, "params": sum(p.numel() for p in model.parameters())}


def train_lora(base: TinyUNet, concept, steps: int, batch: int, seed: int, null_prob: float = 0.15,
               lr: float = 3e-3, log_every: int = 25):
    """Train one LoRA on ``concept`` with ``base`` frozen; returns kohya-style tensors and the loss log."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen = torch.Generator().manual_seed(seed)
    base.requires_grad_(False)
    trainer = LoRATrainer(lora_targets(base))
    opt = torch.optim.AdamW(trainer.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    log, window, t0 = [], [], time.time()
    with trainer:
        for step in range(steps):
            imgs, caps = concept_batch(concept, batch, rng)
            loss = diffusion_loss(base, _to_model_range(imgs), torch.from_numpy(caps), gen, null_prob)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            window.append(loss.item())
            if (step + 1) % log_every == 0 or step == steps - 1:
                log.append((step + 1, float(np.mean(window))))
                window = []
    return trainer.state(), {"loss": log, "seconds": time.time() - t0}
