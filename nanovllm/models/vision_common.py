"""Pieces the Qwen vision towers share: checkpoint prefixes, patch embedding, patch order, 2-D rotary, attention
over variable-length segments.

Patches arrive (from the image processor) in merge-block order: for each t, for each block of ``merge`` × ``merge``
patches in row-major block order, the block's patches row-major.  So the ``merge``² patches a token merges are
consecutive.  Everything here runs eagerly; grids are host integers (the caller reads ``grid_thw`` once).
"""
import torch
import torch.nn.functional as F

# Where a checkpoint keeps a tower's weights: transformers 5 names, then older ones.  A tower's own state-dict
# keys are the checkpoint's with the prefix stripped.
HF_PREFIXES = ("model.visual.", "visual.")


def block_order_hw(t: int, h: int, w: int, merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column [t*h*w] of each patch of a (t, h, w) grid, in merge-block order."""
    rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
    cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
    rows, cols = rows.transpose(1, 2).reshape(-1), cols.transpose(1, 2).reshape(-1)
    return rows.repeat(t), cols.repeat(t)


def rotary_2d(grids: list, merge: int, head_dim: int, theta: float, device) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [patches, head_dim] float32 of the towers' axial rope: a quarter of the dimensions turn with a
    patch's row, the next quarter with its column, and the second half repeats the first (rotate-half form)."""
    quarter = head_dim // 4
    inv_freq = 1.0 / theta ** (torch.arange(quarter, dtype=torch.float32) * 2 / (head_dim // 2))
    rows, cols = zip(*(block_order_hw(t, h, w, merge) for t, h, w in grids))
    angles = torch.cat([torch.cat(rows)[:, None] * inv_freq, torch.cat(cols)[:, None] * inv_freq], dim=1)
    angles = torch.cat([angles, angles], dim=1).to(device)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [N, heads, D] turned by cos/sin [N, D] in float32 (rotate-half form), back in x's dtype."""
    xf = x.float()
    half = xf.shape[-1] // 2
    turned = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    return (xf * cos[:, None] + turned * sin[:, None]).to(x.dtype)


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int]) -> torch.Tensor:
    """Bidirectional attention of q, k, v [N, heads, D] within each segment [bounds[i], bounds[i+1]) only:
    one scaled-dot-product call per distinct segment length, on all segments of that length at once."""
    out = torch.empty_like(q)
    by_length: dict[int, list[int]] = {}
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end > start:
            by_length.setdefault(end - start, []).append(start)
    for length, starts in by_length.items():
        rows = (torch.tensor(starts)[:, None] + torch.arange(length)).to(q.device)  # [segments, length]
        qs, ks, vs = (t[rows].transpose(1, 2) for t in (q, k, v))  # [segments, heads, length, D]
        out[rows] = F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2)
    return out


class PatchEmbed(torch.nn.Module):
    """Each flattened patch [C*T*P*P] -> [hidden] through a Conv3d whose kernel is the patch (HF's weight)."""

    def __init__(self, c: dict, bias: bool):
        super().__init__()
        self.shape = (c["in_channels"], c["temporal_patch_size"], c["patch_size"], c["patch_size"])
        kernel = self.shape[1:]
        self.proj = torch.nn.Conv3d(c["in_channels"], c["hidden_size"], kernel_size=kernel, stride=kernel, bias=bias)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        patches = pixels.view(-1, *self.shape).to(self.proj.weight.dtype)
        return self.proj(patches).view(pixels.shape[0], -1)


class VisionAttention(torch.nn.Module):
    """Multi-head self-attention of a tower block: packed qkv with bias, rope, attention within segments."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=True)
        self.proj = torch.nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor, rope: tuple, bounds: list[int]) -> torch.Tensor:
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.num_heads, -1).unbind(1)
        q, k = rotate(q, *rope), rotate(k, *rope)
        return self.proj(segment_attention(q, k, v, bounds).reshape(x.shape[0], -1))


def image_bounds(grids: list) -> list[int]:
    """Segment bounds of full attention: each frame of each image is one segment."""
    bounds = [0]
    for t, h, w in grids:
        for _ in range(t):
            bounds.append(bounds[-1] + h * w)
    return bounds


def activation(name: str):
    """The tower MLP's activation by its HF name."""
    table = {"silu": F.silu, "gelu": F.gelu, "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
             "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x)}
    if name not in table:
        raise ValueError(f"vision hidden_act {name!r} is not supported; supported: {sorted(table)}")
    return table[name]
