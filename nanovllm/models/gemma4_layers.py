"""Gemma 4's text layers (``gemma4.py`` builds the model from them), as transformers' ``modeling_gemma4.py`` computes.

- ``Gemma4Norm``: RMSNorm whose weight multiplies directly (not ``1 + w`` as Gemma 3's), optionally without one;
- ``rope_tables``: a layer kind's float32 cos/sin; ``proportional`` rope rotates the first
  ``partial_rotary_factor`` of each half's pairs and leaves the others (frequency 0: cos 1, sin 0);
- ``Gemma4Attention``: q/k norms, v normed without a weight, scale 1.0, V = K's projection where
  ``attention_k_eq_v`` (full layers), and, for a KV-shared layer, no K/V of its own: it reads the cache handed in
  (its source layer's) and stores nothing;
- ``Gemma4Router``/``Gemma4Experts``: the MoE block beside the MLP (softmax top-k renormalised, then times a scale per
  expert; GELU experts through ``ops.moe_experts``), each output normed before the two are summed;
- ``Gemma4Layer``: four norms around attention and the GeGLU MLP (and the MoE block where enabled), then
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
        self.total_kv_heads = kv_heads  # unsplit: LoRA's k/v sizes (``lora_targets``)
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
        (rows, cos, sin), lora = rope, inputs.lora_slots
        q = _rotate(self.q_norm(project(self.q_proj, h, lora_slots=lora).view(T, self.num_heads, D)), rows, cos, sin)
        tables, slots = inputs.kv_tables(self.window)  # a sliding layer's: its window pool's, where it has one
        if not self.shared:
            k = project(self.k_proj, h, lora_slots=lora).view(T, self.num_kv_heads, D)
            v = project(self.v_proj, h, lora_slots=lora).view(T, self.num_kv_heads, D) if self.v_proj is not None else k
            k, v = _rotate(self.k_norm(k), rows, cos, sin), self.v_norm(v)
            ops.store_kv(k, v, k_cache, v_cache, slots, *scales)
        o = ops.paged_attention(q.contiguous(), k_cache, v_cache, inputs.cu_seqlens_q, inputs.context_lens,
                                tables, 1.0, *scales, window=self.window)
        return o.reshape(T, self.q_size)


class Gemma4Router(nn.Module):
    """Expert weights and ids [T, top_k] of x [T, H]: logits of ``norm(x) * scale * H ** -0.5``, float32 softmax,
    top-k, renormalised, each times its expert's ``per_expert_scale``."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, eps: float):
        super().__init__()
        self.top_k, self.root = top_k, hidden ** -0.5
        self.norm = Gemma4Norm(hidden, eps, scale=False)
        self.proj = nn.Linear(hidden, num_experts, bias=False)
        self.scale = nn.Parameter(torch.ones(hidden))
        self.per_expert_scale = nn.Parameter(torch.ones(num_experts))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = project(self.proj, self.norm(x) * self.scale * self.root)
        weights, ids = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.per_expert_scale[ids], ids


class Gemma4Experts(nn.Module):
    """Stacked experts as the checkpoint holds them: ``gate_up_proj`` [E, 2I, H] (gate rows first), ``down_proj``
    [E, H, I]; GELU (tanh) of the gate times up."""

    def __init__(self, hidden: int, num_experts: int, intermediate: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate, hidden))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden, intermediate))

    def forward(self, x, weights, ids):
        return ops.moe_experts(x, weights, ids, self.gate_up_proj, self.down_proj, activation="gelu_tanh")


class Gemma4Layer(nn.Module):
    def __init__(self, hidden: int, eps: float, kind: str, attn: Gemma4Attention, mlp: nn.Module,
                 per_layer_dim: int, moe: tuple[int, int, int] | None = None):
        super().__init__()
        self.kind = kind
        self.input_layernorm = Gemma4Norm(hidden, eps)
        self.self_attn = attn
        self.post_attention_layernorm = Gemma4Norm(hidden, eps)
        self.pre_feedforward_layernorm = Gemma4Norm(hidden, eps)
        self.post_feedforward_layernorm = Gemma4Norm(hidden, eps)
        self.mlp = mlp
        self.moe = moe is not None  # (experts, top k, intermediate size) of the MoE block beside the MLP, or None
        if moe is not None:
            self.router = Gemma4Router(hidden, moe[0], moe[1], eps)
            self.experts = Gemma4Experts(hidden, moe[0], moe[2])
            self.pre_feedforward_layernorm_2 = Gemma4Norm(hidden, eps)
            self.post_feedforward_layernorm_1 = Gemma4Norm(hidden, eps)
            self.post_feedforward_layernorm_2 = Gemma4Norm(hidden, eps)
        self.per_layer_dim = per_layer_dim
        if per_layer_dim:
            self.per_layer_input_gate = nn.Linear(hidden, per_layer_dim, bias=False)
            self.per_layer_projection = nn.Linear(per_layer_dim, hidden, bias=False)
            self.post_per_layer_input_norm = Gemma4Norm(hidden, eps)
        self.layer_scalar = nn.Parameter(torch.ones(1), requires_grad=False)  # stored in the checkpoint

    def forward(self, x, h, inputs, kv, next_norm: nn.Module, rope: tuple, per_layer_input, scales=(None, None)):
        return _after_attention(self, next_norm, x, self.self_attn.attend(h, inputs, kv, rope, scales),
                                per_layer_input, inputs.lora_slots)


@_compile_once
def _after_attention(layer: Gemma4Layer, next_norm: nn.Module, x, o, per_layer_input, lora_slots=None):
    x = x + layer.post_attention_layernorm(tp.row_parallel(layer.self_attn.o_proj, o, lora_slots))
    m = layer.mlp(layer.pre_feedforward_layernorm(x), lora_slots)
    if layer.moe:  # the experts take x before its MLP norm, the router x unnormed
        e = layer.experts(layer.pre_feedforward_layernorm_2(x), *layer.router(x))
        m = layer.post_feedforward_layernorm_1(m) + layer.post_feedforward_layernorm_2(e)
    x = x + layer.post_feedforward_layernorm(m)
    if layer.per_layer_dim:
        g = F.gelu(project(layer.per_layer_input_gate, x), approximate="tanh") * per_layer_input
        x = x + layer.post_per_layer_input_norm(project(layer.per_layer_projection, g))
    x = x * layer.layer_scalar
    return x, next_norm(x)
