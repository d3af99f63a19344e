"""Qwen2.5-VL's vision tower: patches [N, C*T*P*P] and their grids -> image-token embeddings [N / merge², out].

A Conv3d patch embedding, ``depth`` pre-norm blocks (RMSNorm, attention with 2-D rope, gated MLP) and a merger
(RMSNorm, then an MLP over each ``merge``² patches).  Most blocks attend within windows of ``window_size`` pixels
(``window_order``); the blocks in ``fullatt_block_indexes`` attend over whole images.  The windowed layout is
kept through all blocks (full attention is order-free within an image) and undone after the merger.  Module
names are transformers': a checkpoint's keys less one of ``hf_prefixes`` load strictly.  Eager; dtype follows the
weights.
"""
import torch
from torch import nn

from nanovllm.models.vision_common import (HF_PREFIXES, PatchEmbed, VisionAttention, activation, image_bounds,
                                           rotary_2d)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        return self.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class GatedMLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=True)
        self.up_proj = nn.Linear(dim, hidden, bias=True)
        self.down_proj = nn.Linear(hidden, dim, bias=True)
        self.act = act

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        dim = c["hidden_size"]
        self.norm1, self.norm2 = RMSNorm(dim), RMSNorm(dim)
        self.attn = VisionAttention(dim, c["num_heads"])
        self.mlp = GatedMLP(dim, c["intermediate_size"], activation(c["hidden_act"]))

    def forward(self, x, rope, bounds):
        x = x + self.attn(self.norm1(x), rope, bounds)
        return x + self.mlp(self.norm2(x))


class Merger(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        dim = c["hidden_size"] * c["spatial_merge_size"] ** 2
        self.ln_q = RMSNorm(c["hidden_size"])
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, c["out_hidden_size"]))

    def forward(self, x):
        merged = self.ln_q(x)
        return self.mlp(merged.view(-1, self.mlp[0].in_features))


DEFAULTS = dict(depth=32, hidden_size=3584, hidden_act="silu", intermediate_size=3420, num_heads=16, in_channels=3,
                patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112, out_hidden_size=3584,
                fullatt_block_indexes=(7, 15, 23, 31))


def window_order(grids: list, merge: int, window: int) -> tuple[torch.Tensor, list[int]]:
    """(merged tokens in window order: index [tokens] into image order; patch bounds of each window).  A window
    is ``window`` × ``window`` merged tokens, tiling each frame from its top-left corner (edge windows smaller)."""
    order, bounds, base = [], [0], 0
    for t, h, w in grids:
        gh, gw = h // merge, w // merge
        ids = torch.arange(t * gh * gw).view(t, gh, gw)
        for f in range(t):
            for r in range(0, gh, window):
                for c in range(0, gw, window):
                    cell = ids[f, r:r + window, c:c + window].reshape(-1)
                    order.append(cell + base)
                    bounds.append(bounds[-1] + cell.numel() * merge * merge)
        base += t * gh * gw
    return torch.cat(order), bounds


class Qwen25VisionTower(nn.Module):
    hf_prefixes = HF_PREFIXES
    def __init__(self, vision_config: dict):
        super().__init__()
        given = {k: v for k, v in vision_config.items() if v is not None}
        if "in_channels" not in given and "in_chans" in given:  # the key older checkpoints' configs use
            given["in_channels"] = given["in_chans"]
        c = dict(DEFAULTS, **given)
        self.merge, self.patch_size, self.window_size = c["spatial_merge_size"], c["patch_size"], c["window_size"]
        self.full_attention = set(c["fullatt_block_indexes"])
        self.head_dim = c["hidden_size"] // c["num_heads"]
        self.rope_theta = float((c.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        self.patch_embed = PatchEmbed(c, bias=False)
        self.blocks = nn.ModuleList(Block(c) for _ in range(c["depth"]))
        self.merger = Merger(c)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        grids = [tuple(g) for g in grid_thw.tolist()]
        unit = self.merge ** 2
        order, window_bounds = window_order(grids, self.merge, self.window_size // self.merge // self.patch_size)
        order = order.to(pixel_values.device)
        patch_order = (order[:, None] * unit + torch.arange(unit, device=order.device)).reshape(-1)
        x = self.patch_embed(pixel_values)[patch_order]
        cos, sin = rotary_2d(grids, self.merge, self.head_dim, self.rope_theta, x.device)
        rope = (cos[patch_order], sin[patch_order])
        full_bounds = image_bounds(grids)  # windows never cross a frame, so frames stay contiguous
        for i, block in enumerate(self.blocks):
            x = block(x, rope, full_bounds if i in self.full_attention else window_bounds)
        return self.merger(x)[torch.argsort(order)]
