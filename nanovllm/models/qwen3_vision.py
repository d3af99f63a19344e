"""Qwen3-VL's vision tower: patches [N, C*T*P*P] and their grids -> (image-token embeddings [N / merge², out],
deepstack features: one [N / merge², out] per entry of ``deepstack_visual_indexes``).

A Conv3d patch embedding plus learned position embeddings (a square table, resampled bilinearly, corners
aligned, to each image's grid: ``interpolated_positions``), ``depth`` pre-norm blocks (LayerNorm, attention with
2-D rope over each whole image, GELU MLP) and a merger.  The outputs of the blocks named in
``deepstack_visual_indexes`` go through their own mergers (LayerNorm after the merge) and are added by the
language model to its first layers' hidden states at the image tokens.  Module names are
transformers': a checkpoint's keys less one of ``hf_prefixes`` load strictly.  Eager; dtype follows the weights.
"""
import torch
from torch import nn

from nanovllm.models.vision_common import (HF_PREFIXES, PatchEmbed, VisionAttention, activation, block_order_hw,
                                           image_bounds, rotary_2d)

DEFAULTS = dict(depth=27, hidden_size=1152, hidden_act="gelu_pytorch_tanh", intermediate_size=4304, num_heads=16,
                in_channels=3, patch_size=16, spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=3584,
                num_position_embeddings=2304, deepstack_visual_indexes=(8, 16, 24))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act):
        super().__init__()
        self.linear_fc1 = nn.Linear(dim, hidden, bias=True)
        self.linear_fc2 = nn.Linear(hidden, dim, bias=True)
        self.act = act

    def forward(self, x):
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class Block(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        dim = c["hidden_size"]
        self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.attn = VisionAttention(dim, c["num_heads"])
        self.mlp = MLP(dim, c["intermediate_size"], activation(c["hidden_act"]))

    def forward(self, x, rope, bounds):
        x = x + self.attn(self.norm1(x), rope, bounds)
        return x + self.mlp(self.norm2(x))


class Merger(nn.Module):
    """Concatenates each ``merge``² patches and projects them; the norm comes before the concatenation (the main
    merger) or after it (the deepstack mergers)."""

    def __init__(self, c: dict, norm_after_merge: bool):
        super().__init__()
        dim = c["hidden_size"] * c["spatial_merge_size"] ** 2
        self.norm_after_merge = norm_after_merge
        self.norm = nn.LayerNorm(dim if norm_after_merge else c["hidden_size"], eps=1e-6)
        self.linear_fc1 = nn.Linear(dim, dim)
        self.linear_fc2 = nn.Linear(dim, c["out_hidden_size"])

    def forward(self, x):
        dim = self.linear_fc1.in_features
        x = self.norm(x.view(-1, dim)) if self.norm_after_merge else self.norm(x).view(-1, dim)
        return self.linear_fc2(nn.functional.gelu(self.linear_fc1(x)))


def interpolated_positions(grids: list, merge: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear resampling (corners aligned) of a ``side`` × ``side`` table to each grid, per patch in
    merge-block order: (table rows [N, 4], weights [N, 4])."""
    rows_all, weights_all = [], []
    for t, h, w in grids:
        r, c = block_order_hw(t, h, w, merge)

        def taps(index, size):
            src = index.float() * (side - 1) / max(size - 1, 1)
            lo = src.floor()
            frac = src - lo
            lo = lo.long()
            return (lo.clamp(0, side - 1), (lo + 1).clamp(0, side - 1)), (1 - frac, frac)

        (r0, r1), (wr0, wr1) = taps(r, h)
        (c0, c1), (wc0, wc1) = taps(c, w)
        rows_all.append(torch.stack([r0 * side + c0, r0 * side + c1, r1 * side + c0, r1 * side + c1], 1))
        weights_all.append(torch.stack([wr0 * wc0, wr0 * wc1, wr1 * wc0, wr1 * wc1], 1))
    return torch.cat(rows_all), torch.cat(weights_all)


class Qwen3VisionTower(nn.Module):
    hf_prefixes = HF_PREFIXES
    def __init__(self, vision_config: dict):
        super().__init__()
        c = dict(DEFAULTS, **{k: v for k, v in vision_config.items() if v is not None})
        self.merge = c["spatial_merge_size"]
        self.head_dim = c["hidden_size"] // c["num_heads"]
        self.rope_theta = float((c.get("rope_parameters") or {}).get("rope_theta", 10000.0))
        self.side = int(c["num_position_embeddings"] ** 0.5)
        self.patch_embed = PatchEmbed(c, bias=True)
        self.pos_embed = nn.Embedding(c["num_position_embeddings"], c["hidden_size"])
        self.blocks = nn.ModuleList(Block(c) for _ in range(c["depth"]))
        self.merger = Merger(c, norm_after_merge=False)
        self.deepstack_visual_indexes = list(c["deepstack_visual_indexes"])
        self.deepstack_merger_list = nn.ModuleList(Merger(c, norm_after_merge=True)
                                                   for _ in self.deepstack_visual_indexes)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list]:
        grids = [tuple(g) for g in grid_thw.tolist()]
        x = self.patch_embed(pixel_values)
        rows, weights = interpolated_positions(grids, self.merge, self.side)
        table = self.pos_embed(rows.to(x.device))  # [N, 4, hidden]
        x = x + (table * weights.to(x.device, table.dtype)[:, :, None]).sum(1).to(x.dtype)
        rope = rotary_2d(grids, self.merge, self.head_dim, self.rope_theta, x.device)
        bounds = image_bounds(grids)
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, rope, bounds)
            if i in self.deepstack_visual_indexes:
                deepstack.append(self.deepstack_merger_list[self.deepstack_visual_indexes.index(i)](x))
        return self.merger(x), deepstack
