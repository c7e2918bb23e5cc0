"""A tiny Flux-shaped DiT with BFL layer names.

As Forge's ``backend/nn/flux.py:400-422``: the 16-channel latent is padded to even
size and packed ``b c (h 2) (w 2) -> b (h w) (c 4)`` into tokens, double blocks hold
packed ``img_attn.qkv``/``txt_attn.qkv``, single blocks a fused ``linear1`` (q, k, v and
the MLP input), the guidance value enters through ``guidance_in``; the output is
unpacked and cropped back. The net predicts a velocity (``PredictionFlux``).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..operations import Linear
from .unet import timestep_embedding


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim, hidden):
        super().__init__()
        self.in_layer = Linear(in_dim, hidden)
        self.out_layer = Linear(hidden, hidden)

    def forward(self, x):
        return self.out_layer(torch.nn.functional.silu(self.in_layer(x)))


class _Mod(nn.Module):
    def __init__(self, hidden, n):
        super().__init__()
        self.lin = Linear(hidden, n * hidden)

    def forward(self, vec):
        return self.lin(torch.nn.functional.silu(vec))[:, None].chunk(self.lin.out_features // vec.shape[-1], dim=-1)


class _Attn(nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.qkv = Linear(hidden, hidden * 3)
        self.proj = Linear(hidden, hidden)


def _attention(q, k, v):
    w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
    return w @ v


class DoubleBlock(nn.Module):
    def __init__(self, hidden, mlp):
        super().__init__()
        self.img_mod, self.txt_mod = _Mod(hidden, 6), _Mod(hidden, 6)
        self.img_attn, self.txt_attn = _Attn(hidden), _Attn(hidden)
        self.img_mlp = nn.Sequential(Linear(hidden, mlp), nn.GELU(), Linear(mlp, hidden))
        self.txt_mlp = nn.Sequential(Linear(hidden, mlp), nn.GELU(), Linear(mlp, hidden))
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)

    def forward(self, img, txt, vec):
        i1, i2, i3, i4, i5, i6 = self.img_mod(vec)
        t1, t2, t3, t4, t5, t6 = self.txt_mod(vec)
        iq, ik, iv = self.img_attn.qkv(self.norm(img) * (1 + i2) + i1).chunk(3, dim=-1)
        tq, tk, tv = self.txt_attn.qkv(self.norm(txt) * (1 + t2) + t1).chunk(3, dim=-1)
        a = _attention(torch.cat([tq, iq], 1), torch.cat([tk, ik], 1), torch.cat([tv, iv], 1))
        ta, ia = a[:, :txt.shape[1]], a[:, txt.shape[1]:]
        img = img + i3 * self.img_attn.proj(ia)
        img = img + i6 * self.img_mlp(self.norm(img) * (1 + i5) + i4)
        txt = txt + t3 * self.txt_attn.proj(ta)
        txt = txt + t6 * self.txt_mlp(self.norm(txt) * (1 + t5) + t4)
        return img, txt


class SingleBlock(nn.Module):
    def __init__(self, hidden, mlp):
        super().__init__()
        self.hidden, self.mlp = hidden, mlp
        self.linear1 = Linear(hidden, hidden * 3 + mlp)
        self.linear2 = Linear(hidden + mlp, hidden)
        self.modulation = _Mod(hidden, 3)
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)

    def forward(self, x, vec):
        shift, scale, gate = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1(self.norm(x) * (1 + scale) + shift), [3 * self.hidden, self.mlp], -1)
        q, k, v = qkv.chunk(3, dim=-1)
        return x + gate * self.linear2(torch.cat([_attention(q, k, v), torch.nn.functional.gelu(mlp)], -1))


class _Final(nn.Module):
    def __init__(self, hidden, out):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), Linear(hidden, 2 * hidden))
        self.linear = Linear(hidden, out)
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec)[:, None].chunk(2, dim=-1)
        return self.linear(self.norm(x) * (1 + scale) + shift)


class TinyFlux(nn.Module):
    def __init__(self, in_channels=16, hidden=32, mlp=64, context_dim=24, vec_dim=16, depth=1, depth_single=1,
                 guidance_embed=True):
        super().__init__()
        self.config = dict(in_channels=in_channels, hidden_size=hidden, mlp_hidden=mlp, depth=depth,
                           depth_single=depth_single, guidance_embed=guidance_embed)
        self.in_channels = in_channels
        self.img_in = Linear(in_channels * 4, hidden)
        self.txt_in = Linear(context_dim, hidden)
        self.time_in = MLPEmbedder(16, hidden)
        self.vector_in = MLPEmbedder(vec_dim, hidden)
        if guidance_embed:
            self.guidance_in = MLPEmbedder(16, hidden)
        self.double_blocks = nn.ModuleList([DoubleBlock(hidden, mlp) for _ in range(depth)])
        self.single_blocks = nn.ModuleList([SingleBlock(hidden, mlp) for _ in range(depth_single)])
        self.final_layer = _Final(hidden, in_channels * 4)

    def forward(self, x, timestep, context, y, guidance=None, **kwargs):
        b, c, h, w = x.shape
        ph, pw = (-h) % 2, (-w) % 2
        x = torch.nn.functional.pad(x, (0, pw, 0, ph), mode="circular")
        hh, ww = x.shape[2] // 2, x.shape[3] // 2
        img = x.reshape(b, c, hh, 2, ww, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, hh * ww, c * 4)
        vec = self.time_in(timestep_embedding(timestep * 1000, 16).to(x.dtype)) + self.vector_in(y.to(x.dtype))
        if guidance is not None and hasattr(self, "guidance_in"):
            vec = vec + self.guidance_in(timestep_embedding(guidance * 1000, 16).to(x.dtype))
        img, txt = self.img_in(img), self.txt_in(context.to(x.dtype))
        for block in self.double_blocks:
            img, txt = block(img, txt, vec)
        seq = torch.cat([txt, img], 1)
        for block in self.single_blocks:
            seq = block(seq, vec)
        img = self.final_layer(seq[:, txt.shape[1]:], vec)
        out = img.reshape(b, hh, ww, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, hh * 2, ww * 2)
        return out[:, :, :h, :w]
