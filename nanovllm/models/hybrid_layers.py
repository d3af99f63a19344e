"""The two token mixers of the hybrid models (Qwen3-Next, Qwen3.5): Gated DeltaNet and gated full attention.

``GatedDeltaNet``: input projections, a causal depthwise convolution over concat(q, k, v) with a per-sequence
convolution state, the gated delta rule with a per-sequence float32 recurrent state (both ops of
``kernels/linear_attention``, over the state pools of this layer), and a gated RMSNorm.  Two projection layouts:
Qwen3-Next's fused ``in_proj_qkvz`` / ``in_proj_ba``, interleaved per key-head group, and Qwen3.5's separate
``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``.  The output projection runs in the caller.

``GatedAttention``: q (with an output gate per head, ``q_proj`` emitting [q, gate] per head), k and v packed in
one projection, zero-centred q/k RMSNorm, rope on the first ``rotary_dim`` dims of each head, the paged KV store
and attention ops, then ``o * sigmoid(gate)``.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.kernels import kv_quant, ops
from nanovllm.kernels.linear_attention import ops as la_ops
from nanovllm.kernels.norm_rope import apply_rotary
from nanovllm.layers.norm import GatedRMSNorm, ZeroCenteredRMSNorm
from nanovllm.models.decoder import project
from nanovllm.quant import held
from nanovllm.step import StepInputs


@dataclass
class LinearArgs:
    """A Gated DeltaNet layer's sizes: key/value heads and head dims, the convolution's kernel."""
    num_k_heads: int
    num_v_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_kernel: int

    @classmethod
    def from_hf(cls, cfg: dict) -> "LinearArgs":
        args = cls(cfg["linear_num_key_heads"], cfg["linear_num_value_heads"], cfg["linear_key_head_dim"],
                   cfg["linear_value_head_dim"], cfg.get("linear_conv_kernel_dim", 4))
        if args.num_v_heads % args.num_k_heads:
            raise ValueError(f"config linear_num_value_heads={args.num_v_heads} is not a multiple of "
                             f"linear_num_key_heads={args.num_k_heads}")
        return args

    @property
    def key_dim(self) -> int:
        return self.num_k_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.num_v_heads * self.head_v_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.key_dim + self.value_dim

    def local(self, size: int) -> "LinearArgs":
        """This rank's share under tensor parallelism of ``size`` ranks: key and value heads split."""
        for name, heads in (("linear_num_key_heads", self.num_k_heads), ("linear_num_value_heads", self.num_v_heads)):
            if heads % size:
                raise ValueError(f"tensor_parallel_size={size} does not divide {name}={heads}")
        return LinearArgs(self.num_k_heads // size, self.num_v_heads // size, self.head_k_dim, self.head_v_dim,
                          self.conv_kernel)

    def state_shapes(self) -> tuple[tuple, tuple]:
        """Per slot: the convolution state (channels, K-1) and the recurrent state (HV, DK, DV)."""
        return (self.conv_dim, self.conv_kernel - 1), (self.num_v_heads, self.head_k_dim, self.head_v_dim)


class GatedDeltaNet(nn.Module):
    """``la``: this rank's heads; ``whole``: all of them.  The concatenated q/k/v projection (Qwen3.5) and the
    convolution are built and loaded whole, then ``keep_rank_channels`` cuts this rank's q, k and v channels out of
    them (the checkpoint lays them out [all q | all k | all v]); every other tensor is loaded as this rank's slice."""

    def __init__(self, hidden_size: int, la: LinearArgs, eps: float, interleaved: bool, whole: LinearArgs):
        super().__init__()
        self.la, self.whole, self.interleaved = la, whole, interleaved
        if interleaved:
            self.in_proj_qkvz = nn.Linear(hidden_size, 2 * la.key_dim + 2 * la.value_dim, bias=False)
            self.in_proj_ba = nn.Linear(hidden_size, 2 * la.num_v_heads, bias=False)
        else:
            self.in_proj_qkv = nn.Linear(hidden_size, whole.conv_dim, bias=False)
            self.in_proj_z = nn.Linear(hidden_size, la.value_dim, bias=False)
            self.in_proj_b = nn.Linear(hidden_size, la.num_v_heads, bias=False)
            self.in_proj_a = nn.Linear(hidden_size, la.num_v_heads, bias=False)
        self.conv1d = nn.Conv1d(whole.conv_dim, whole.conv_dim, la.conv_kernel, groups=whole.conv_dim, bias=False)
        self.dt_bias = nn.Parameter(torch.ones(la.num_v_heads))
        self.A_log = nn.Parameter(torch.zeros(la.num_v_heads))
        self.norm = GatedRMSNorm(la.head_v_dim, eps)
        self.out_proj = nn.Linear(la.value_dim, hidden_size, bias=False)
        self.max_chain = 1  # the most rows a step chains (``kernels/linear_attention/ops.py``; a verify step's)

    @torch.no_grad()
    def keep_rank_channels(self, rank: int) -> None:
        """Cut this rank's q, k and v channels out of the whole convolution (and Qwen3.5's q/k/v projection, in
        whatever format it holds: ``quant/held.keep_rows``)."""
        la, whole = self.la, self.whole
        if la.conv_dim == whole.conv_dim:
            return
        rows = torch.cat([torch.arange(start + rank * n, start + (rank + 1) * n) for start, n in
                          ((0, la.key_dim), (whole.key_dim, la.key_dim), (2 * whole.key_dim, la.value_dim))])
        for module in [self.conv1d] + ([] if self.interleaved else [self.in_proj_qkv]):
            held.keep_rows(module, rows)  # a quantized projection's scales too

    def quant_targets(self) -> list[tuple[nn.Module, str, bool]]:
        """The projections a weight quantization holds: every input projection and the output one."""
        ins = [self.in_proj_qkvz, self.in_proj_ba] if self.interleaved else \
            [self.in_proj_qkv, self.in_proj_z, self.in_proj_b, self.in_proj_a]
        return [(m, "weight", False) for m in ins] + [(self.out_proj, "weight", True)]

    def _project(self, h: torch.Tensor):
        """(concat(q, k, v) [T, conv_dim], z [T, value_dim], b, a [T, HV]) in the conv's channel order."""
        la, T = self.la, h.shape[0]
        if not self.interleaved:
            return (project(self.in_proj_qkv, h), project(self.in_proj_z, h), project(self.in_proj_b, h),
                    project(self.in_proj_a, h))
        r = la.num_v_heads // la.num_k_heads
        qkvz = project(self.in_proj_qkvz, h).view(T, la.num_k_heads, -1)
        q, k, v, z = torch.split(qkvz, [la.head_k_dim, la.head_k_dim, r * la.head_v_dim, r * la.head_v_dim], dim=2)
        b, a = torch.split(project(self.in_proj_ba, h).view(T, la.num_k_heads, 2 * r), [r, r], dim=2)
        mixed = torch.cat((q.reshape(T, -1), k.reshape(T, -1), v.reshape(T, -1)), dim=1)
        return mixed, z.reshape(T, -1), b.reshape(T, -1), a.reshape(T, -1)

    def mix(self, h: torch.Tensor, inputs: StepInputs, state: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """[T, value_dim] before the output projection; updates this layer's state pools in each row's slot."""
        la, T = self.la, h.shape[0]
        conv_state, ssm_state = state
        mixed, z, b, a = self._project(h)
        captures = (inputs.capture_slots, inputs.capture_lens, inputs.state_chain, self.max_chain)
        mixed = la_ops.causal_conv1d(mixed.contiguous(), self.conv1d.weight[:, 0], conv_state, inputs.state_slots,
                                     inputs.cu_seqlens_q, inputs.context_lens, *captures)
        q, k, v = torch.split(mixed, [la.key_dim, la.key_dim, la.value_dim], dim=1)
        beta = b.sigmoid().float()
        g = -self.A_log.float().exp() * F.softplus(a.float() + self.dt_bias)
        o = la_ops.gated_delta_rule(q.reshape(T, la.num_k_heads, la.head_k_dim).contiguous(),
                                    k.reshape(T, la.num_k_heads, la.head_k_dim).contiguous(),
                                    v.reshape(T, la.num_v_heads, la.head_v_dim).contiguous(), g.contiguous(),
                                    beta.contiguous(), ssm_state, inputs.state_slots, inputs.cu_seqlens_q,
                                    inputs.context_lens, *captures)
        o = self.norm(o.reshape(-1, la.head_v_dim), z.reshape(-1, la.head_v_dim))
        return o.reshape(T, la.value_dim)


class GatedAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int, rotary_dim: int,
                 eps: float, bias: bool):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.rotary_dim, self.scale = rotary_dim, head_dim ** -0.5
        self.q_size, self.kv_size = num_heads * head_dim, num_kv_heads * head_dim
        self.qkv_proj = nn.Linear(hidden_size, 2 * self.q_size + 2 * self.kv_size, bias=bias)
        self.o_proj = nn.Linear(self.q_size, hidden_size, bias=bias)
        self.q_norm = ZeroCenteredRMSNorm(head_dim, eps)
        self.k_norm = ZeroCenteredRMSNorm(head_dim, eps)
        self.register_buffer("k_scale", torch.ones(num_kv_heads, dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones(num_kv_heads, dtype=torch.float32), persistent=False)

    def packed_sizes(self) -> list[int]:
        """Rows of q (with its gate), k and v in ``qkv_proj``."""
        return [2 * self.q_size, self.kv_size, self.kv_size]

    def quant_targets(self) -> list[tuple[nn.Module, str, bool]]:
        return [(self.qkv_proj, "weight", False), (self.o_proj, "weight", True)]

    def mix(self, h: torch.Tensor, inputs: StepInputs, kv: tuple[torch.Tensor, torch.Tensor],
            rope: tuple) -> torch.Tensor:
        """[T, heads * head_dim] before the output projection: gated attention over the paged cache, after storing
        this step's k and v in it.  ``rope``: each token's row of the cos/sin tables (``rotary_dim`` wide)."""
        T, D, R = h.shape[0], self.head_dim, self.rotary_dim
        k_cache, v_cache = kv
        scales = (self.k_scale, self.v_scale) if kv_quant.is_fp8(k_cache) else (None, None)
        qg, k, v = torch.split(project(self.qkv_proj, h), self.packed_sizes(), dim=1)
        qg = qg.view(T, self.num_heads, 2 * D)
        q, gate = self.q_norm(qg[..., :D]), qg[..., D:].reshape(T, self.q_size)
        k = self.k_norm(k.view(T, self.num_kv_heads, D))
        rows, cos, sin = rope
        q_rot, k_rot = apply_rotary(rows, q[..., :R], k[..., :R], cos, sin)
        q = torch.cat((q_rot, q[..., R:]), dim=-1)
        k = torch.cat((k_rot, k[..., R:]), dim=-1)
        ops.store_kv(k, v.reshape(T, self.num_kv_heads, D), k_cache, v_cache, inputs.slot_mapping, *scales)
        o = ops.paged_attention(q.contiguous(), k_cache, v_cache, inputs.cu_seqlens_q, inputs.context_lens,
                                inputs.block_tables, self.scale, *scales)
        return o.reshape(T, self.q_size) * torch.sigmoid(gate)
