"""The FP8 KV cache's number format: what a stored K or V element is, and how it is written and read back.

An FP8 cache holds ``float8_e4m3fn`` elements with one float32 scale per (layer, KV head) for K and one for V
(``k_scale``/``v_scale`` [Hkv]): an element ``x`` is stored as ``round_to_nearest_even(clamp(x / scale, ±448))``,
``x`` being the value in the model's dtype, and read back as ``stored * scale``.  Every implementation (the
PyTorch twins here and in ``reference.py``, the Triton kernels) rounds the same way; attention multiplies in 16 or
32 bits after widening (the Triton kernels: fp16 for a bf16 model), never in FP8.  A cache in the model's dtype
takes no scales (None).
"""
import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448, the largest finite e4m3fn value


def is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype == FP8_DTYPE


def quantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x`` [..., Hkv, D] in the model's dtype -> e4m3 with per-head ``scale`` [Hkv] (float32)."""
    return (x.float() / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def dequantize(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """e4m3 ``x`` [..., Hkv, L, D] -> float32 with per-head ``scale`` [Hkv]."""
    return x.float() * scale[:, None, None]


def round_trip(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """What reading ``x`` [..., Hkv, D] back from an FP8 cache gives, in float32 (the oracle's hook uses it)."""
    return quantize(x, scale).float() * scale[:, None]
