"""The mini-world's denoiser, its diffusion schedule, LoRA training and kohya-style files.

- :class:`TinyUNet`: a pixel-space v-prediction UNet (16x16 -> 8x8 -> 4x4) with
  cross-attention on token embeddings at every resolution; about 0.5M parameters.
- Diffusion: cosine noise schedule over 1000 training timesteps, v-prediction
  (``v = sqrt(ab) eps - sqrt(1 - ab) x0``, a noise-like form, well behaved at both ends
  of the schedule for a model this small); deterministic DDIM steps (:func:`ddim_step`).
- LoRA: low-rank factors on every attention projection (linear, rank 8) and every
  3x3 convolution of the residual blocks (conv, rank 4). :class:`LoRATrainer` trains
  them with the base frozen (its own forward hooks, not the routing runtime), and
  :func:`save_kohya` / :func:`load_kohya` write and read kohya-style safetensors
  (``lora_unet_<module>.lora_down.weight``, ``.lora_up.weight``, ``.alpha``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from loratorio.lora import LowRank

T_TRAIN = 1000
EMB_DIM = 32


def alpha_bar(t: torch.Tensor) -> torch.Tensor:
    """Cosine schedule: the signal fraction ``alpha_bar`` at integer timesteps ``t`` in [0, 1000)."""
    s = 0.008
    f = torch.cos(((t.float() / T_TRAIN) + s) / (1 + s) * math.pi / 2) ** 2
    f0 = math.cos(s / (1 + s) * math.pi / 2) ** 2
    return (f / f0).clamp(1e-5, 0.9999)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(8, cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.temb = nn.Linear(temb, cout)
        self.norm2 = nn.GroupNorm(8, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, t):
        h = self.conv1(F.silu(self.norm1(x))) + self.temb(t)[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return h + self.skip(x)


class CrossAttention(nn.Module):
    def __init__(self, channels: int, ctx_dim: int = EMB_DIM, dim: int = 32):
        super().__init__()
        self.norm = nn.GroupNorm(8, channels)
        self.to_q = nn.Linear(channels, dim, bias=False)
        self.to_k = nn.Linear(ctx_dim, dim, bias=False)
        self.to_v = nn.Linear(ctx_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, channels)

    def forward(self, x, ctx):
        b, c, h, w = x.shape
        hs = self.norm(x).flatten(2).transpose(1, 2)
        q, k, v = self.to_q(hs), self.to_k(ctx), self.to_v(ctx)
        attn = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(q.shape[-1]), dim=-1)
        return x + self.to_out(attn @ v).transpose(1, 2).reshape(b, c, h, w)


class Level(nn.Module):
    def __init__(self, cin: int, cout: int, temb: int):
        super().__init__()
        self.res = ResBlock(cin, cout, temb)
        self.attn = CrossAttention(cout)

    def forward(self, x, t, ctx):
        return self.attn(self.res(x, t), ctx)


class TinyUNet(nn.Module):
    """v(x_t, t, tokens): ``x [B, 3, 16, 16]``, ``t [B]`` timesteps, ``tokens [B, L]`` ids."""

    def __init__(self, vocab: int, channels=(32, 64, 64), temb: int = 64):
        super().__init__()
        c0, c1, c2 = channels
        self.tokens = nn.Embedding(vocab, EMB_DIM)
        self.time = nn.Sequential(nn.Linear(32, temb), nn.SiLU(), nn.Linear(temb, temb))
        self.conv_in = nn.Conv2d(3, c0, 3, padding=1)
        self.down0 = Level(c0, c0, temb)
        self.pool0 = nn.Conv2d(c0, c1, 3, stride=2, padding=1)
        self.down1 = Level(c1, c1, temb)
        self.pool1 = nn.Conv2d(c1, c2, 3, stride=2, padding=1)
        self.mid = Level(c2, c2, temb)
        self.mid_post = ResBlock(c2, c2, temb)
        self.up1 = Level(c2 + c1, c1, temb)
        self.up0 = Level(c1 + c0, c0, temb)
        self.out = nn.Sequential(nn.GroupNorm(8, c0), nn.SiLU(), nn.Conv2d(c0, 3, 3, padding=1))

    def forward(self, x, t, tokens):
        freqs = torch.exp(-math.log(1e4) * torch.arange(16, device=x.device) / 16)
        ang = t.float()[:, None] * freqs[None]
        te = self.time(torch.cat([ang.sin(), ang.cos()], dim=1))
        ctx = self.tokens(tokens)
        h0 = self.down0(self.conv_in(x), te, ctx)
        h1 = self.down1(self.pool0(h0), te, ctx)
        h = self.mid_post(self.mid(self.pool1(h1), te, ctx), te)
        h = self.up1(torch.cat([F.interpolate(h, scale_factor=2), h1], 1), te, ctx)
        h = self.up0(torch.cat([F.interpolate(h, scale_factor=2), h0], 1), te, ctx)
        return self.out(h)


def lora_targets(model: TinyUNet) -> dict[str, nn.Module]:
    """Modules a LoRA adapts: attention projections (linear) and residual 3x3 convolutions."""
    out = {}
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if (isinstance(module, nn.Linear) and leaf in ("to_q", "to_k", "to_v", "to_out")) or (
            isinstance(module, nn.Conv2d) and leaf in ("conv1", "conv2")
        ):
            out[name] = module
    if len({kohya_name(n) for n in out}) != len(out):
        raise ValueError("two target modules map to the same kohya key")
    return out


def kohya_name(module_name: str) -> str:
    return "lora_unet_" + module_name.replace(".", "_")


def diffusion_loss(model, x0, tokens, gen: torch.Generator, null_prob: float) -> torch.Tensor:
    """v-prediction MSE at uniform timesteps; captions replaced by the null caption with ``null_prob``."""
    b = x0.shape[0]
    t = torch.randint(0, T_TRAIN, (b,), generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    ab = alpha_bar(t)[:, None, None, None]
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    drop = torch.rand(b, generator=gen) < null_prob
    tokens = torch.where(drop[:, None], torch.zeros_like(tokens), tokens)
    target = ab.sqrt() * noise - (1 - ab).sqrt() * x0
    return F.mse_loss(model(xt, t, tokens), target)


class _LoRAParams(nn.Module):
    def __init__(self, module: nn.Module, rank: int, alpha: float):
        super().__init__()
        conv = isinstance(module, nn.Conv2d)
        if conv:
            cin, cout = module.in_channels, module.out_channels
            self.down = nn.Parameter(torch.empty(rank, cin, *module.kernel_size))
            self.up = nn.Parameter(torch.zeros(cout, rank, 1, 1))
        else:
            cin, cout = module.in_features, module.out_features
            self.down = nn.Parameter(torch.empty(rank, cin))
            self.up = nn.Parameter(torch.zeros(cout, rank))
        nn.init.kaiming_uniform_(self.down, a=math.sqrt(5))
        self.conv, self.module, self.rank, self.alpha = conv, module, rank, alpha

    def delta(self, x):
        if self.conv:
            m = self.module
            h = F.conv2d(x, self.down, stride=m.stride, padding=m.padding)
            return F.conv2d(h, self.up) * (self.alpha / self.rank)
        return F.linear(F.linear(x, self.down), self.up) * (self.alpha / self.rank)


class LoRATrainer(nn.Module):
    """Trainable LoRA factors hooked onto a frozen model (added outputs, weights untouched)."""

    def __init__(self, targets: dict[str, nn.Module], linear_rank: int = 8, conv_rank: int = 4):
        super().__init__()
        self.names = list(targets)
        self.params = nn.ModuleList(
            _LoRAParams(m, conv_rank if isinstance(m, nn.Conv2d) else linear_rank,
                        float(conv_rank if isinstance(m, nn.Conv2d) else linear_rank))
            for m in targets.values()
        )
        self._handles = []

    def __enter__(self):
        for p in self.params:
            self._handles.append(p.module.register_forward_hook(lambda _m, args, out, p=p: out + p.delta(args[0])))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def state(self) -> dict[str, torch.Tensor]:
        """Kohya-style tensors: ``lora_unet_<module>.{lora_down.weight, lora_up.weight, alpha}``."""
        out = {}
        for name, p in zip(self.names, self.params):
            key = kohya_name(name)
            out[f"{key}.lora_down.weight"] = p.down.detach().clone().contiguous()
            out[f"{key}.lora_up.weight"] = p.up.detach().clone().contiguous()
            out[f"{key}.alpha"] = torch.tensor(float(p.alpha))
        return out


def save_kohya(path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    save_file(tensors, str(path), metadata=metadata or {})


def load_kohya(path, targets: dict[str, nn.Module], multiplier: float = 1.0) -> dict[str, LowRank]:
    """Read a kohya-style LoRA file into an adapter set ``module name -> LowRank`` (scale = alpha/rank*multiplier)."""
    tensors = load_file(str(path))
    by_key = {kohya_name(n): n for n in targets}
    out = {}
    for key, module_name in by_key.items():
        down = tensors.get(f"{key}.lora_down.weight")
        if down is None:
            continue
        up = tensors[f"{key}.lora_up.weight"]
        rank = down.shape[0]
        alpha = float(tensors[f"{key}.alpha"]) if f"{key}.alpha" in tensors else float(rank)
        out[module_name] = LowRank(down, up, scale=alpha / rank * multiplier)
    unknown = {k.split(".", 1)[0] for k in tensors} - set(by_key)
    if unknown:
        raise ValueError(f"{path}: keys for unknown modules {sorted(unknown)[:3]}")
    return out


def ddim_timesteps(steps: int) -> list[int]:
    return torch.linspace(T_TRAIN - 1, 0, steps).round().long().tolist()


def ddim_step(x: torch.Tensor, v: torch.Tensor, t: int, t_prev: int | None) -> torch.Tensor:
    """One deterministic DDIM step from timestep ``t`` to ``t_prev`` (None: to the clean image), given ``v``."""
    ab = alpha_bar(torch.tensor(t))
    ab_prev = alpha_bar(torch.tensor(t_prev)) if t_prev is not None else torch.tensor(1.0)
    x0 = (ab.sqrt() * x - (1 - ab).sqrt() * v).clamp(-1, 1)
    eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
    return ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * eps
