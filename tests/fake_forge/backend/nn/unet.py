"""A tiny SD-shaped UNet with ldm layer names (``input_blocks``, ``proj_in``, ``attn2.to_k``, ...).

Forge's UNet keeps the ldm names (``backend/nn/unet.py``), so LoRA keys map to
``diffusion_model.<ldm name>.weight``. ``linear_proj`` picks SDXL's linear
``proj_in``/``proj_out`` instead of SD1.5's 1x1 convolutions; ``adm_in`` adds the
pooled-vector input (``y``) SDXL has. A ControlNet's ``control['middle']`` is added
after the transformer block, as residuals are in the real UNet.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..operations import Conv2d, Linear


def timestep_embedding(t, dim):
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class CrossAttention(nn.Module):
    def __init__(self, dim, context_dim=None):
        super().__init__()
        context_dim = context_dim or dim
        self.to_q = Linear(dim, dim, bias=False)
        self.to_k = Linear(context_dim, dim, bias=False)
        self.to_v = Linear(context_dim, dim, bias=False)
        self.to_out = nn.Sequential(Linear(dim, dim))

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        w = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        return self.to_out(w @ v)


class FeedForward(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.net = nn.Sequential(_GEGLU(dim, inner), nn.Identity(), Linear(inner, dim))

    def forward(self, x):
        return self.net(x)


class _GEGLU(nn.Module):
    def __init__(self, dim, inner):
        super().__init__()
        self.proj = Linear(dim, inner * 2)

    def forward(self, x):
        a, gate = self.proj(x).chunk(2, dim=-1)
        return a * torch.nn.functional.gelu(gate)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, context_dim):
        super().__init__()
        self.attn1 = CrossAttention(dim)
        self.attn2 = CrossAttention(dim, context_dim)
        self.ff = FeedForward(dim, dim * 2)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, ch, context_dim, linear_proj):
        super().__init__()
        self.linear_proj = linear_proj
        self.norm = nn.GroupNorm(4, ch)
        self.proj_in = Linear(ch, ch) if linear_proj else Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList([BasicTransformerBlock(ch, context_dim)])
        self.proj_out = Linear(ch, ch) if linear_proj else Conv2d(ch, ch, 1)

    def forward(self, x, context):
        b, c, h, w = x.shape
        y = self.norm(x)
        if not self.linear_proj:
            y = self.proj_in(y)
        y = y.flatten(2).transpose(1, 2)
        if self.linear_proj:
            y = self.proj_in(y)
        for block in self.transformer_blocks:
            y = block(y, context)
        if self.linear_proj:
            y = self.proj_out(y)
        y = y.transpose(1, 2).reshape(b, c, h, w)
        if not self.linear_proj:
            y = self.proj_out(y)
        return x + y


class ResBlock(nn.Module):
    def __init__(self, ch, emb_ch):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(4, ch), nn.SiLU(), Conv2d(ch, ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), Linear(emb_ch, ch))
        self.out_layers = nn.Sequential(nn.GroupNorm(4, ch), nn.SiLU(), nn.Identity(), Conv2d(ch, ch, 3, padding=1))

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return x + self.out_layers(h)


class TinyUNet(nn.Module):
    def __init__(self, in_channels=4, out_channels=4, ch=16, context_dim=24, linear_proj=False, adm_in=None):
        super().__init__()
        self.config = dict(in_channels=in_channels, model_channels=ch, context_dim=context_dim, adm_in_channels=adm_in)
        self.ch = ch
        self.time_embed = nn.Sequential(Linear(ch, ch * 2), nn.SiLU(), Linear(ch * 2, ch * 2))
        if adm_in:
            self.label_emb = nn.Sequential(nn.Sequential(Linear(adm_in, ch * 2)))
        self.input_blocks = nn.ModuleList([
            nn.Sequential(Conv2d(in_channels, ch, 3, padding=1)),
            nn.ModuleList([ResBlock(ch, ch * 2), SpatialTransformer(ch, context_dim, linear_proj)]),
        ])
        self.out = nn.Sequential(nn.GroupNorm(4, ch), nn.SiLU(), Conv2d(ch, out_channels, 3, padding=1))

    def forward(self, x, timesteps, context=None, y=None, control=None, transformer_options=None, **kwargs):
        emb = self.time_embed(timestep_embedding(timesteps, self.ch).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y.to(x.dtype))
        h = self.input_blocks[0](x)
        res, st = self.input_blocks[1]
        h = st(res(h, emb), context.to(x.dtype))
        if control is not None and control.get("middle"):
            h = h + control["middle"][0].to(h)
        return self.out(h)
