"""Tiny CLIP-like and T5-like text encoders with Hugging Face layer names.

Parameter names match Forge's text-encoder keys relative to ``clip.cond_stage_model``:
``clip_l.transformer.text_model.encoder.layers.N.self_attn.q_proj.weight`` and
``t5xxl.transformer.encoder.block.N.layer.0.SelfAttention.q.weight``.
"""

from __future__ import annotations

import math
import zlib

import torch
from torch import nn

from ..operations import Linear

VOCAB, TOKENS = 64, 8


def tokenize(texts, length=TOKENS):
    """Words to ids by a stable hash; BOS 0, EOS/pad 1."""
    out = []
    for text in texts:
        ids = [0, *[2 + zlib.crc32(w.encode()) % (VOCAB - 2) for w in text.lower().split()][:length - 2], 1]
        out.append(ids + [1] * (length - len(ids)))
    return torch.tensor(out)


class _SelfAttn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.out_proj = Linear(d, d), Linear(d, d), Linear(d, d), Linear(d, d)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.out_proj(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(x.shape[-1]), -1) @ v)


class _ClipLayer(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.self_attn = _SelfAttn(d)
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = Linear(d, 2 * d), Linear(2 * d, d)

    def forward(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp.fc2(torch.nn.functional.gelu(self.mlp.fc1(self.layer_norm2(x))))


class _ClipTextModel(nn.Module):
    def __init__(self, d, layers):
        super().__init__()
        self.embeddings = nn.Module()
        self.embeddings.token_embedding = nn.Embedding(VOCAB, d)
        self.encoder = nn.Module()
        self.encoder.layers = nn.ModuleList([_ClipLayer(d) for _ in range(layers)])
        self.final_layer_norm = nn.LayerNorm(d)


class TinyClip(nn.Module):
    """Returns ``(hidden [B, T, d], pooled [B, d])``."""

    def __init__(self, d=24, layers=1):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.text_model = _ClipTextModel(d, layers)

    def forward(self, ids):
        tm = self.transformer.text_model
        x = tm.embeddings.token_embedding(ids)
        for layer in tm.encoder.layers:
            x = layer(x)
        x = tm.final_layer_norm(x)
        return x, x[:, -1]


class _T5Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        att = nn.Module()
        att.SelfAttention = nn.Module()
        for n in ("q", "k", "v", "o"):
            setattr(att.SelfAttention, n, Linear(d, d, bias=False))
        ff = nn.Module()
        ff.DenseReluDense = nn.Module()
        ff.DenseReluDense.wi, ff.DenseReluDense.wo = Linear(d, 2 * d, bias=False), Linear(2 * d, d, bias=False)
        self.layer = nn.ModuleList([att, ff])

    def forward(self, x):
        a = self.layer[0].SelfAttention
        q, k, v = a.q(x), a.k(x), a.v(x)
        x = x + a.o(torch.softmax(q @ k.transpose(1, 2), -1) @ v)
        f = self.layer[1].DenseReluDense
        return x + f.wo(torch.relu(f.wi(x)))


class TinyT5(nn.Module):
    def __init__(self, d=24, layers=1):
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.shared = nn.Embedding(VOCAB, d)
        self.transformer.encoder = nn.Module()
        self.transformer.encoder.block = nn.ModuleList([_T5Block(d) for _ in range(layers)])

    def forward(self, ids):
        x = self.transformer.shared(ids)
        for block in self.transformer.encoder.block:
            x = block(x)
        return x
