"""A tiny SD-shaped model with A1111's layer names and random weights.

``model.diffusion_model`` is a small UNet in the ldm layout (``input_blocks``,
``middle_block``, ``output_blocks``, ``out``; res blocks with ``in_layers`` /
``emb_layers`` / ``out_layers``; spatial transformers with ``proj_in``, ``attn1``,
``attn2``, ``ff``, ``proj_out``). The text encoder is CLIP-like (SD1: ``transformer.
text_model.encoder.layers.N.self_attn.q_proj``...) or OpenCLIP-like (SD2: a
``nn.MultiheadAttention`` per block, ``model.transformer.resblocks.N.attn``).

Linear, Conv2d and MultiheadAttention layers call the fake built-in Lora's
``network_apply_weights`` before their forward, as A1111's patched layers do, so LoRAs
left to the built-in are merged lazily into the weights exactly like in the WebUI.
"""

from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

VOCAB = 512
TOKENS = 8


def _apply_builtin(module):
    import networks  # the fake built-in, installed under its WebUI name

    networks.network_apply_weights(module)


class Linear(nn.Linear):
    def forward(self, x):
        _apply_builtin(self)
        return super().forward(x)


class Conv2d(nn.Conv2d):
    def forward(self, x):
        _apply_builtin(self)
        return super().forward(x)


class MultiheadAttention(nn.MultiheadAttention):
    def forward(self, *args, **kwargs):
        _apply_builtin(self)
        return super().forward(*args, **kwargs)


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs.to(t.device)[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class ResBlock(nn.Module):
    def __init__(self, ch, emb):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(8, ch), nn.SiLU(), Conv2d(ch, ch, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), Linear(emb, ch))
        self.out_layers = nn.Sequential(nn.GroupNorm(8, ch), nn.SiLU(), nn.Dropout(0.0), Conv2d(ch, ch, 3, padding=1))

    def forward(self, x, emb):
        h = self.in_layers(x) + self.emb_layers(emb)[:, :, None, None]
        return x + self.out_layers(h)


class Attention(nn.Module):
    def __init__(self, dim, ctx_dim, heads=2):
        super().__init__()
        self.heads = heads
        self.to_q = Linear(dim, dim, bias=False)
        self.to_k = Linear(ctx_dim, dim, bias=False)
        self.to_v = Linear(ctx_dim, dim, bias=False)
        self.to_out = nn.Sequential(Linear(dim, dim), nn.Dropout(0.0))

    def forward(self, x, context=None):
        context = x if context is None else context
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        b, n, d = q.shape
        h = self.heads

        def split(t):
            return t.reshape(b, -1, h, d // h).transpose(1, 2)

        out = F.scaled_dot_product_attention(split(q), split(k), split(v))
        return self.to_out(out.transpose(1, 2).reshape(b, n, d))


class FeedForward(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.net = nn.Sequential(nn.Sequential(Linear(dim, dim * 2)), nn.GELU(), Linear(dim * 2, dim))

    def forward(self, x):
        return self.net(x)


class TransformerBlock(nn.Module):
    def __init__(self, dim, ctx_dim):
        super().__init__()
        self.attn1 = Attention(dim, dim)
        self.attn2 = Attention(dim, ctx_dim)
        self.ff = FeedForward(dim)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    def __init__(self, ch, ctx_dim):
        super().__init__()
        self.norm = nn.GroupNorm(8, ch)
        self.proj_in = Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(ch, ctx_dim)])
        self.proj_out = Conv2d(ch, ch, 1)

    def forward(self, x, context):
        b, c, h, w = x.shape
        y = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            y = block(y, context)
        return x + self.proj_out(y.transpose(1, 2).reshape(b, c, h, w))


class TimestepSequential(nn.Sequential):
    def forward(self, x, emb, context):
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            else:
                x = layer(x)
        return x


class UNet(nn.Module):
    def __init__(self, in_ch=4, ch=16, ctx_dim=32, emb=32, adm_in=None):
        super().__init__()
        self.ch = ch
        self.calls = 0
        self.time_embed = nn.Sequential(Linear(ch, emb), nn.SiLU(), Linear(emb, emb))
        if adm_in is not None:  # SDXL: the pooled text and size vector join the time embedding
            self.label_emb = nn.Sequential(nn.Sequential(Linear(adm_in, emb), nn.SiLU(), Linear(emb, emb)))
        self.input_blocks = nn.ModuleList([
            TimestepSequential(Conv2d(in_ch, ch, 3, padding=1)),
            TimestepSequential(ResBlock(ch, emb), SpatialTransformer(ch, ctx_dim)),
        ])
        self.middle_block = TimestepSequential(ResBlock(ch, emb), SpatialTransformer(ch, ctx_dim))
        self.output_blocks = nn.ModuleList([TimestepSequential(Conv2d(2 * ch, ch, 1), ResBlock(ch, emb))])
        self.out = nn.Sequential(nn.GroupNorm(8, ch), nn.SiLU(), Conv2d(ch, 4, 3, padding=1))

    def forward(self, x, timesteps, context, y=None):
        self.calls += 1  # UNet calls, for tests and benchmarks that count model calls per step
        emb = self.time_embed(timestep_embedding(timesteps, self.ch).to(x.dtype))
        if y is not None:
            emb = emb + self.label_emb(y)
        hs = []
        h = x
        for block in self.input_blocks:
            h = block(h, emb, context)
            hs.append(h)
        h = self.middle_block(h, emb, context)
        for block in self.output_blocks:
            h = block(torch.cat([h, hs.pop()], dim=1), emb, context)
        return self.out(h)


class DiffusionWrapper(nn.Module):
    def __init__(self, unet, conditioning_key="crossattn"):
        super().__init__()
        self.diffusion_model = unet
        self.conditioning_key = conditioning_key


def tokenize(text: str) -> list[list[int]]:
    """Token chunks of ``TOKENS`` ids (``TOKENS - 1`` words each), like the WebUI's 75-token chunks."""
    words = text.replace(",", " ").split()
    ids = [1 + zlib.crc32(w.lower().encode()) % (VOCAB - 2) for w in words]
    per = TOKENS - 1
    chunks = [ids[i:i + per] for i in range(0, len(ids), per)] or [[]]
    return [[0, *c] + [VOCAB - 1] * (per - len(c)) for c in chunks]


class ClipEncoderLayer(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.self_attn = nn.Module()
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            setattr(self.self_attn, name, Linear(dim, dim))
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Module()
        self.mlp.fc1, self.mlp.fc2 = Linear(dim, 2 * dim), Linear(2 * dim, dim)

    def forward(self, x):
        a = self.self_attn
        h = self.layer_norm1(x)
        b, n, d = h.shape
        q, k, v = (t.reshape(b, n, 2, d // 2).transpose(1, 2) for t in (a.q_proj(h), a.k_proj(h), a.v_proj(h)))
        h = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, n, d)
        x = x + a.out_proj(h)
        return x + self.mlp.fc2(F.gelu(self.mlp.fc1(self.layer_norm2(x))))


class ClipText(nn.Module):
    """SD1-like: ``transformer.text_model.{embeddings, encoder.layers.N, final_layer_norm}``."""

    def __init__(self, dim=32, layers=2):
        super().__init__()
        tm = nn.Module()
        tm.embeddings = nn.Module()
        tm.embeddings.token_embedding = nn.Embedding(VOCAB, dim)
        tm.embeddings.position_embedding = nn.Embedding(TOKENS, dim)
        tm.encoder = nn.Module()
        tm.encoder.layers = nn.ModuleList([ClipEncoderLayer(dim) for _ in range(layers)])
        tm.final_layer_norm = nn.LayerNorm(dim)
        self.transformer = nn.Module()
        self.transformer.text_model = tm

    def forward(self, ids):
        tm = self.transformer.text_model
        x = tm.embeddings.token_embedding(ids) + tm.embeddings.position_embedding.weight[None]
        for layer in tm.encoder.layers:
            x = layer(x)
        return tm.final_layer_norm(x)


class OpenClipBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = MultiheadAttention(dim, 2, batch_first=True)
        self.mlp = nn.Module()
        self.mlp.c_fc, self.mlp.c_proj = Linear(dim, 2 * dim), Linear(2 * dim, dim)

    def forward(self, x):
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x))))


class OpenClipText(nn.Module):
    """SD2-like: ``model.transformer.resblocks.N.{attn (MultiheadAttention), mlp.c_fc, mlp.c_proj}``."""

    def __init__(self, dim=32, layers=2):
        super().__init__()
        self.model = nn.Module()
        self.model.token_embedding = nn.Embedding(VOCAB, dim)
        self.model.positional_embedding = nn.Parameter(torch.randn(TOKENS, dim) * 0.02)
        self.model.transformer = nn.Module()
        self.model.transformer.resblocks = nn.ModuleList([OpenClipBlock(dim) for _ in range(layers)])
        self.model.ln_final = nn.LayerNorm(dim)

    def forward(self, ids):
        x = self.model.token_embedding(ids) + self.model.positional_embedding[None]
        for block in self.model.transformer.resblocks:
            x = block(x)
        return self.model.ln_final(x)


class CondStage(nn.Module):
    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped

    def forward(self, texts):
        chunked = [tokenize(t) for t in texts]
        n = max(len(c) for c in chunked)
        empty = tokenize("")[0]
        outs = []
        device = next(self.parameters()).device
        for i in range(n):
            ids = torch.tensor([c[i] if i < len(c) else empty for c in chunked], dtype=torch.long, device=device)
            outs.append(self.wrapped(ids).float())
        return torch.cat(outs, dim=1)


class Embedder(nn.Module):
    def __init__(self, wrapped):
        super().__init__()
        self.wrapped = wrapped


class Conditioner(nn.Module):
    """SDXL-like: two text encoders (CLIP-like, OpenCLIP-like); ``crossattn`` and a pooled ``vector``."""

    def __init__(self, dim=32):
        super().__init__()
        self.embedders = nn.ModuleList([Embedder(ClipText(dim)), Embedder(OpenClipText(dim))])

    def forward(self, texts, width, height):
        chunked = [tokenize(t) for t in texts]
        n = max(len(c) for c in chunked)
        empty = tokenize("")[0]
        outs = []
        device = next(self.parameters()).device
        for i in range(n):
            ids = torch.tensor([c[i] if i < len(c) else empty for c in chunked], dtype=torch.long, device=device)
            outs.append(torch.cat([e.wrapped(ids).float() for e in self.embedders], dim=-1))
        crossattn = torch.cat(outs, dim=1)
        size = torch.tensor([[width / 64.0, height / 64.0]], device=device).expand(len(texts), 2)
        return {"crossattn": crossattn, "vector": torch.cat([crossattn[:, 0], size], dim=-1)}


class CheckpointInfo:
    def __init__(self, filename):
        self.filename = filename
        self.short_title = filename


class TinySD(nn.Module):
    """``shared.sd_model`` of the fake: UNet + text encoder + an alphas_cumprod schedule."""

    def __init__(self, text_encoder="clip", seed=0, parameterization="eps", name="tiny.safetensors"):
        super().__init__()
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            self.is_sdxl = text_encoder == "sdxl"
            if self.is_sdxl:
                self.model = DiffusionWrapper(UNet(ctx_dim=64, adm_in=66))
                self.conditioner = Conditioner()
            else:
                self.model = DiffusionWrapper(UNet())
                wrapped = ClipText() if text_encoder == "clip" else OpenClipText()
                self.cond_stage_model = CondStage(wrapped)
            for p in self.parameters():
                # larger random weights than default init, so LoRA effects and base outputs are both visible
                if p.dim() > 1:
                    nn.init.normal_(p, std=0.3 / math.sqrt(p.shape[1]))
        finally:
            torch.random.set_rng_state(gen_state)
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1 - betas, 0).float(), persistent=False)
        self.parameterization = parameterization
        self.cond_stage_key = "txt"
        self.sd_checkpoint_info = CheckpointInfo(name)
        self.sd_model_hash = f"{seed:08x}"
        self.latent_channels = 4
        self.requires_grad_(False)
        self.eval()

    def text_encoders(self):
        """``(prefix, wrapped)`` of each text encoder, as the built-in Lora names their layers."""
        if self.is_sdxl:
            return [(f"{i}_", e.wrapped) for i, e in enumerate(self.conditioner.embedders)]
        return [("", self.cond_stage_model.wrapped)]

    def get_learned_conditioning(self, texts):
        if self.is_sdxl:
            width = getattr(texts, "width", None) or 64
            height = getattr(texts, "height", None) or 64
            return self.conditioner(list(texts), width, height)
        return self.cond_stage_model(list(texts))

    def apply_model(self, x, t, cond):
        # as the WebUI's hijack: inputs in the UNet's dtype, output back in float32
        dtype = self.model.diffusion_model.out[2].weight.dtype
        if self.is_sdxl:
            out = self.model.diffusion_model(x.to(dtype), t, cond["crossattn"].to(dtype), y=cond["vector"].to(dtype))
        else:
            out = self.model.diffusion_model(x.to(dtype), t, torch.cat(cond["c_crossattn"], 1).to(dtype))
        return out.float()

    def decode_first_stage(self, z):
        return torch.tanh(z[:, :3].float().cpu()).repeat_interleave(2, -1).repeat_interleave(2, -2)
