"""Gemma 4's text layers (``gemma4.py`` builds the model from them), as transformers' ``modeling_gemma4.py`` computes.

- ``Gemma4Norm``: RMSNorm whose weight multiplies directly (not ``1 + w`` as Gemma 3's), optionally without one;
- ``rope_tables``: a layer kind's float32 cos/sin; ``proportional`` rope rotates the first
  ``partial_rotary_factor`` of each half's pairs and leaves the others (frequency 0: cos 1, sin 0);
- ``Gemma4Attention``: q/k norms, v normed without a weight, scale 1.0, V = K's projection where
  ``attention_k_eq_v`` (full layers), and, for a KV-shared layer, no K/V of its own: it reads the cache handed in
  (its source layer's) and stores nothing;
- ``Gemma4Layer``: four norms around attention and the GeGLU MLP (beside which the MoE block adds its experts), then
  the per-layer input (gate, GELU, times this layer's slice of the per-layer inputs, projection, norm) and the
  layer's scalar, all after attention in one compile region.
"""
import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.kernels import kv_quant, ops
from nanovllm.kernels.norm_rope import _cos_sin, rotate_half
from nanovllm.models import tensor_parallel as tp
from nanovllm.models.decoder import _compile_once, project
from nanovllm.step import StepInputs


class Gemma4Norm(nn.Module):
    """``x * (mean(x^2) + eps) ** -0.5 * w`` in float32, rounded once; ``scale=False``: no ``w``."""

    def __init__(self, dim: int, eps: float, scale: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if scale else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.pow(xf.pow(2).mean(-1, keepdim=True) + self.eps, -0.5)
        if self.weight is not None:
            xf = xf * self.weight.float()
        return xf.to(x.dtype)


def rope_tables(head_dim: int, max_position: int, params: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) [max_position, head_dim] for one layer kind's ``rope_parameters`` (``default``, ``proportional``)."""
    kind, base = params.get("rope_type", "default"), float(params.get("rope_theta", 10000.0))
    if kind == "default":
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    elif kind == "proportional":
        pairs = int(params.get("partial_rotary_factor", 1.0) * head_dim // 2)
        inv_freq = 1.0 / (base ** (torch.arange(0, 2 * pairs, 2, dtype=torch.int64).float() / head_dim))
        inv_freq = torch.cat((inv_freq, torch.zeros(head_dim // 2 - pairs, dtype=torch.float32)))
        inv_freq = inv_freq / params.get("factor", 1.0)
    else:
        raise ValueError(f"Gemma 4 rope_type {kind!r} is not supported (expected default or proportional)")
    return _cos_sin(inv_freq, max_position)


def _rotate(x: torch.Tensor, rows: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    c, s = cos[rows].to(x.dtype)[:, None, :], sin[rows].to(x.dtype)[:, None, :]
    return x * c + rotate_half(x) * s


class Gemma4Attention(nn.Module):
    """One layer's attention: ``heads`` query heads and ``kv_heads`` KV heads of ``head_dim`` (per layer kind),
    within ``window`` tokens (0: all).  ``shared``: a KV-shared layer (q and o only)."""

    def __init__(self, hidden: int, heads: int, kv_heads: int, head_dim: int, eps: float, window: int,
                 k_eq_v: bool, shared: bool, bias: bool = False):
        super().__init__()
        self.num_heads = tp.split(heads, "num_attention_heads")
        self.num_kv_heads, self.head_dim = tp.kv_heads(kv_heads)[0], head_dim
        self.q_size, self.kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.window, self.shared = window, shared
        self.q_proj = nn.Linear(hidden, self.q_size, bias=bias)
        self.q_norm = Gemma4Norm(head_dim, eps)
        if not shared:
            self.k_proj = nn.Linear(hidden, self.kv_size, bias=bias)
            self.v_proj = None if k_eq_v else nn.Linear(hidden, self.kv_size, bias=bias)
            self.k_norm = Gemma4Norm(head_dim, eps)
        self.v_norm = Gemma4Norm(head_dim, eps, scale=False)
        self.o_proj = nn.Linear(self.q_size, hidden, bias=bias)
        self.register_buffer("k_scale", torch.ones(self.num_kv_heads, dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones(self.num_kv_heads, dtype=torch.float32), persistent=False)

    def quant_targets(self) -> list[tuple[nn.Module, str, bool]]:
        own = [] if self.shared else [self.k_proj] + ([self.v_proj] if self.v_proj is not None else [])
        return [(m, "weight", False) for m in [self.q_proj] + own] + [(self.o_proj, "weight", True)]

    def attend(self, h, inputs: StepInputs, kv: tuple[torch.Tensor, torch.Tensor], rope: tuple,
               scales: tuple = (None, None)) -> torch.Tensor:
        """``kv``: this layer's cache, or its source layer's for a shared one (``scales``: that layer's FP8 scales)."""
        T, D = h.shape[0], self.head_dim
        k_cache, v_cache = kv
        if not kv_quant.is_fp8(k_cache):
            scales = (None, None)
        elif scales[0] is None:
            scales = (self.k_scale, self.v_scale)
        rows, cos, sin = rope
        q = _rotate(self.q_norm(project(self.q_proj, h).view(T, self.num_heads, D)), rows, cos, sin)
        tables, slots = inputs.kv_tables(self.window)  # a sliding layer's: its window pool's, where it has one
        if not self.shared:
            k = project(self.k_proj, h).view(T, self.num_kv_heads, D)
            v = project(self.v_proj, h).view(T, self.num_kv_heads, D) if self.v_proj is not None else k
            k, v = _rotate(self.k_norm(k), rows, cos, sin), self.v_norm(v)
            ops.store_kv(k, v, k_cache, v_cache, slots, *scales)
        o = ops.paged_attention(q.contiguous(), k_cache, v_cache, inputs.cu_seqlens_q, inputs.context_lens,
                                tables, 1.0, *scales, window=self.window)
        return o.reshape(T, self.q_size)


class Gemma4Layer(nn.Module):
    def __init__(self, hidden: int, eps: float, kind: str, attn: Gemma4Attention, mlp: nn.Module,
                 per_layer_dim: int, moe: nn.Module | None = None):
        super().__init__()
        self.kind = kind
        self.input_layernorm = Gemma4Norm(hidden, eps)
        self.self_attn = attn
        self.post_attention_layernorm = Gemma4Norm(hidden, eps)
        self.pre_feedforward_layernorm = Gemma4Norm(hidden, eps)
        self.post_feedforward_layernorm = Gemma4Norm(hidden, eps)
        self.mlp = mlp
        self.moe = moe  # the MoE block beside the MLP (gemma4_moe.py), or None
        self.per_layer_dim = per_layer_dim
        if per_layer_dim:
            self.per_layer_input_gate = nn.Linear(hidden, per_layer_dim, bias=False)
            self.per_layer_projection = nn.Linear(per_layer_dim, hidden, bias=False)
            self.post_per_layer_input_norm = Gemma4Norm(hidden, eps)
        self.layer_scalar = nn.Parameter(torch.ones(1), requires_grad=False)  # stored in the checkpoint

    def forward(self, x, h, inputs, kv, next_norm: nn.Module, rope: tuple, per_layer_input, scales=(None, None)):
        return _after_attention(self, next_norm, x, self.self_attn.attend(h, inputs, kv, rope, scales),
                                per_layer_input)


@_compile_once
def _after_attention(layer: Gemma4Layer, next_norm: nn.Module, x, o, per_layer_input):
    x = x + layer.post_attention_layernorm(tp.row_parallel(layer.self_attn.o_proj, o))
    m = layer.mlp(layer.pre_feedforward_layernorm(x))
    if layer.moe is not None:
        m = layer.moe(x, m)
    x = x + layer.post_feedforward_layernorm(m)
    if layer.per_layer_dim:
        g = F.gelu(project(layer.per_layer_input_gate, x), approximate="tanh") * per_layer_input
        x = x + layer.post_per_layer_input_norm(project(layer.per_layer_projection, g))
    x = x * layer.layer_scalar
    return x, next_norm(x)
