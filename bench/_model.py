"""SD-shaped UNets with random weights, and rank-r LoRA adapters on kohya's default targets.

No weights are downloaded: the UNets are built from the published model configs with
random initialisation, which has the same shapes, FLOPs and memory traffic as the real
checkpoints. The adapters are random low-rank factors sized like a kohya LoRA.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from loratorio.lora import LowRank

# Stable Diffusion 1.5's UNet, as published in its unet/config.json.
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640, 1280, 1280),
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
    "use_linear_projection": False,
}

# The first two levels of SD1.5 (its real channel widths 320 and 640, cross-attention at
# both, mid block at 640), one layer per block: a CPU-sized model with the same kinds of
# layers as the full one.
SD15_TWO_LEVELS = {
    **SD15_UNET,
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "block_out_channels": (320, 640),
    "layers_per_block": 1,
}

# A toy of the same structure that builds and runs in well under a second (smoke runs).
TINY_UNET = {
    **SD15_TWO_LEVELS,
    "block_out_channels": (32, 64),
    "cross_attention_dim": 64,
}

# SD1.5's whole layout (4 levels, 2 layers per block, 16 transformer blocks: the same 192
# LoRA targets) at 32 channels on every level and a 32-wide text context: each module's
# arithmetic, and its adapters', is so small that the fixed cost per module (hook,
# bookkeeping, launches) dominates. (With SD1.5's 768-wide context the rank-16 adapters
# of the 32 cross-attention key/value projections alone would be most of the routed
# call's extra time.)
SD15_NARROW = {
    **SD15_UNET,
    "block_out_channels": (32, 32, 32, 32),
    "cross_attention_dim": 32,
}

# Stable Diffusion XL base 1.0's UNet, as published in its unet/config.json.
SDXL_UNET = {
    "sample_size": 128,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (320, 640, 1280),
    "layers_per_block": 2,
    "transformer_layers_per_block": (1, 2, 10),
    "cross_attention_dim": 2048,
    "attention_head_dim": (5, 10, 20),
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

MODELS = {
    "sd15": SD15_UNET,
    "sd15-2level": SD15_TWO_LEVELS,
    "tiny": TINY_UNET,
    "sd15-narrow": SD15_NARROW,
    "sdxl": SDXL_UNET,
}

CONTEXT_TOKENS = 77


@dataclass
class Model:
    """A UNet and what a call of it needs besides the latent."""

    name: str
    unet: nn.Module
    config: dict
    device: torch.device
    dtype: torch.dtype
    targets: dict[str, nn.Module] = field(default_factory=dict)
    _backups: dict = field(default_factory=dict, repr=False)

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.unet.parameters())

    def weight_backup(self) -> dict[str, torch.Tensor]:
        """A copy of every target weight, made once per dtype (what a merge path restores from)."""
        dtype = next(iter(self.targets.values())).weight.dtype
        if dtype not in self._backups:
            self._backups.clear()
            self._backups[dtype] = {name: m.weight.detach().clone() for name, m in self.targets.items()}
        return self._backups[dtype]

    def context(self, rows: int, seed: int) -> torch.Tensor:
        """Text-encoder hidden states ``[rows, 77, cross_attention_dim]`` (random, as the weights are)."""
        gen = torch.Generator().manual_seed(seed)
        ctx = torch.randn(rows, CONTEXT_TOKENS, self.config["cross_attention_dim"], generator=gen)
        return ctx.to(self.device, self.dtype)

    def extra(self, rows: int) -> dict | None:
        """SDXL's pooled text embedding and size/crop conditioning; None for SD1.5."""
        if self.config.get("addition_embed_type") != "text_time":
            return None
        pooled = self.config["projection_class_embeddings_input_dim"] - 6 * self.config["addition_time_embed_dim"]
        side = 8 * self.config["sample_size"]
        time_ids = torch.tensor([side, side, 0, 0, side, side], dtype=torch.float32)
        return {
            "text_embeds": torch.zeros(rows, pooled, device=self.device, dtype=self.dtype),
            "time_ids": time_ids.expand(rows, 6).to(self.device, self.dtype),
        }

    def __call__(self, x: torch.Tensor, context: torch.Tensor, extra: dict | None = None) -> torch.Tensor:
        """One UNet call: noise prediction for every row of ``x`` ``[rows, 4, H, W]``."""
        timestep = torch.full((x.shape[0],), 500.0, device=x.device)
        return self.unet(x, timestep, encoder_hidden_states=context, added_cond_kwargs=extra, return_dict=False)[0]


def build(name: str, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> Model:
    """Build the named UNet (a key of :data:`MODELS`) with random weights, in eval mode."""
    from diffusers import UNet2DConditionModel

    config = MODELS[name]
    device = torch.device(device)
    torch.manual_seed(seed)
    # Initialising on the target device skips a multi-second CPU init of large models.
    with torch.device(device):
        unet = UNet2DConditionModel(**config)
    if dtype != torch.float32:
        unet = unet.to(dtype=dtype)
    unet = unet.eval().requires_grad_(False)
    model = Model(name, unet, dict(config), device, dtype)
    model.targets = lora_targets(unet)
    return model


def lora_targets(unet: nn.Module) -> dict[str, nn.Module]:
    """Modules kohya's default SD LoRA trains in the UNet: every Linear and 1x1 Conv2d inside a
    transformer block (proj_in/proj_out, attention to_q/to_k/to_v/to_out.0, feed-forward)."""
    targets: dict[str, nn.Module] = {}
    for block_name, block in unet.named_modules():
        if type(block).__name__ != "Transformer2DModel":
            continue
        for sub_name, sub in block.named_modules():
            is_1x1 = isinstance(sub, nn.Conv2d) and tuple(sub.kernel_size) == (1, 1)
            if isinstance(sub, nn.Linear) or is_1x1:
                targets[f"{block_name}.{sub_name}"] = sub
    return targets


def make_adapters(targets: dict[str, nn.Module], count: int, *, rank: int = 16, strength: float = 0.1,
                  seed: int = 1, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> list[dict]:
    """``count`` adapter sets of random rank-``rank`` factors on every target.

    ``strength`` sets the delta's size relative to the base weight (a delta entry is about
    ``strength / sqrt(in)``, the base weights about ``1 / sqrt(3 in)``): 0.1 moves the
    UNet output by a few percent, as a real LoRA at weight 1 does.
    """
    gen = torch.Generator().manual_seed(seed)
    adapters = []
    for _ in range(count):
        adapter_set = {}
        for name, module in targets.items():
            out_f, in_f = module.weight.shape[:2]
            down = torch.randn(rank, in_f, generator=gen) / in_f**0.5
            up = torch.randn(out_f, rank, generator=gen) * (strength / rank**0.5)
            if module.weight.dim() == 4:
                down, up = down[:, :, None, None], up[:, :, None, None]
            adapter_set[name] = LowRank(down.to(device, dtype), up.to(device, dtype), scale=1.0)
        adapters.append(adapter_set)
    return adapters
