"""RMSNorm and rotary position embedding as pure torch functions, computed the way transformers computes them.

float32 results equal transformers' bit for bit (the parity tests rely on it), so the rounding steps are those of
its code: RMSNorm's statistics in float32 with the normed value rounded to the input's dtype before the weight
scales it, and rope's float32 cos/sin rounded to q's dtype before they multiply.  ``layers/`` builds its modules on
these, the twins in ``reference.py`` call them, and ``triton_rope_store.py`` reproduces their rounding.
"""
import math

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: statistics in float32, the normed value rounded to x's dtype, then scaled."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
                 sin_cache: torch.Tensor):
    """q [T, Hq, D], k [T, Hkv, D] rotated by the float32 cos/sin rows of their positions (rounded to q's dtype)."""
    cos = cos_cache[positions].to(q.dtype)[:, None, :]
    sin = sin_cache[positions].to(q.dtype)[:, None, :]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama-3.x long-context scaling: slow down low frequencies, keep high ones, blend in between."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(head_dim: int, max_position: int, base: float, scaling: dict | None = None):
    """float32 (cos, sin) tables [max_position, head_dim] of the rotate-half rope, with Llama-3 scaling if asked."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type == "llama3":
        inv_freq = llama3_inv_freq(inv_freq, scaling)
    elif rope_type not in ("default", None):
        raise NotImplementedError(f"rope_scaling type {rope_type!r} is not supported (supported: default, llama3)")
    positions = torch.arange(max_position, dtype=torch.int64).float()
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()
