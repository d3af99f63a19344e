"""RMSNorm as a module; the math (``kernels/norm_rope.rms_norm``) matches transformers' bit for bit in float32."""
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
