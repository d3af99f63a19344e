"""RMSNorm modules: the plain one (its math, ``kernels/norm_rope.rms_norm``, matches transformers' bit for bit in
float32), and the zero-centred and gated ones of the hybrid models."""
import torch
from torch import nn

from nanovllm.kernels.norm_rope import rms_norm


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class ZeroCenteredRMSNorm(nn.Module):
    """RMSNorm whose weight is stored as an offset from 1 (Qwen3-Next, Qwen3.5): ``norm(x) * (1 + w)``, all in
    float32 and rounded once at the end, as transformers computes it."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """The output norm of a Gated DeltaNet layer: ``w * norm(x) * silu(z)``, the norm rounded to x's dtype before
    the weight scales it and the gate applied in float32 (transformers' ``RMSNormGated``)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return (rms_norm(x, self.weight, self.eps) * torch.nn.functional.silu(z.float())).to(x.dtype)
