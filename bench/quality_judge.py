"""The judge: a small classifier that says which concept of each category an image shows.

It is trained on rendered images with their ground-truth labels (the whole world,
generic and named members alike) and scores generated images:

- concept recall: for each concept a composition asks for, does the judge see it;
- spurious rate: for each category the prompt does not name, does the judge see a
  named concept there anyway;
- quality proxies: the judge's mean confidence (max class probability averaged over
  categories) and a Frechet distance between the judge's features of generated images
  and of rendered images with the same labels (lower is closer to real images).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.quality_world import HEAD_CLASSES, random_labels, render_batch

FEATURES = 32


class Judge(nn.Module):
    """Images ``[B, 3, 16, 16]`` in [0, 1] -> one logit vector per head and features.

    The heads are the five categories, then the right figure of a pair (0 = single layout).
    """

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.SiLU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.SiLU(),
            nn.Flatten(), nn.Linear(64 * 16, FEATURES), nn.SiLU(),
        )
        self.heads = nn.ModuleList(nn.Linear(FEATURES, n) for n in HEAD_CLASSES)

    def forward(self, x):
        f = self.body(x)
        return [h(f) for h in self.heads], f


def _batch(n: int, rng: np.random.Generator):
    labels = [random_labels(rng) for _ in range(n)]
    imgs = torch.from_numpy(render_batch(labels, rng))
    return imgs, torch.tensor([lab.values for lab in labels])


def train_judge(steps: int, batch: int, seed: int, log_every: int = 50):
    """Train on freshly rendered images with noise augmentation (generated images are not clean renders)."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    judge = Judge()
    opt = torch.optim.Adam(judge.parameters(), lr=2e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    losses = []
    for step in range(steps):
        imgs, y = _batch(batch, rng)
        sigma = torch.rand(batch, 1, 1, 1) * 0.08
        imgs = (imgs + sigma * torch.randn_like(imgs)).clamp(0, 1)
        logits, _ = judge(imgs)
        loss = sum(F.cross_entropy(lg, y[:, i]) for i, lg in enumerate(logits))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % log_every == 0 or step == steps - 1:
            losses.append((step, loss.item()))
    judge.eval()
    return judge, losses


@torch.no_grad()
def held_out_accuracy(judge: Judge, n: int, seed: int) -> dict:
    """Accuracy on ``n`` fresh rendered images: per category, mean over categories, all five right."""
    imgs, y = _batch(n, np.random.default_rng(seed))
    logits, _ = judge(imgs)
    right = torch.stack([lg.argmax(1) == y[:, i] for i, lg in enumerate(logits)], 1).float()
    return {
        "per_category": right.mean(0).tolist(),
        "mean": float(right.mean()),
        "all": float(right.all(1).float().mean()),
        "n": n,
    }


@torch.no_grad()
def judge_images(judge: Judge, imgs: torch.Tensor):
    """Predicted class per category ``[B, 5]``, confidence ``[B]`` and features ``[B, FEATURES]``."""
    logits, feats = judge(imgs.clamp(0, 1))
    probs = [lg.softmax(1) for lg in logits]
    pred = torch.stack([p.argmax(1) for p in probs], 1)
    conf = torch.stack([p.max(1).values for p in probs], 1).mean(1)
    return pred, conf, feats


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to feature sets ``a`` and ``b`` (``[n, d]`` each)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = torch.cov(a.T), torch.cov(b.T)
    # trace sqrt(ca cb) from the eigenvalues of sqrt(ca) cb sqrt(ca) (symmetric PSD)
    ea, va = torch.linalg.eigh(ca)
    sa = va @ torch.diag(ea.clamp_min(0).sqrt()) @ va.T
    cross = torch.linalg.eigvalsh(sa @ cb @ sa).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + ca.trace() + cb.trace() - 2 * cross)
