"""Shapes and inputs shared by the quantized fused-MoE kernel tests (tests/test_fp8_moe_kernel.py and
tests/test_int4_moe_kernel.py): a small MoE whose hidden and intermediate sizes give one group, several groups or a
partial last group, tiles whose K width a group narrows, seeded inputs, and a relative error."""
import torch

from nanovllm.kernels.moe_configs import MoeConfig

HIDDEN, INTER, EXPERTS, TOP_K = 80, 48, 8, 2
CFG = MoeConfig(16, 32, 64)  # block_k 64: groups of 16 and 32 narrow the K tile
GROUPS = {"one_group": HIDDEN, "several_groups": 16, "partial_last_group": 32}  # 32: 80 = 32+32+16, 48 = 32+16


def inputs(num_tokens, seed=0):
    """x [T, HIDDEN] and router logits [T, EXPERTS], float32, seeded."""
    gen = torch.Generator().manual_seed(100 + seed)
    return torch.randn(num_tokens, HIDDEN, generator=gen), torch.randn(num_tokens, EXPERTS, generator=gen)


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def transposed_view(t):
    """``t`` [E, H, X] as a view over [E, X, H] memory, as an expert cache keeps ``w2`` and its scales."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)
