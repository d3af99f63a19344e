"""The dense decoder-only transformer that Qwen3, Qwen2/2.5 and Llama share, as a function of ``StepInputs``.

Variants differ only in flags read from the HF config: q/k RMSNorm (Qwen3), qkv bias (Qwen2), attention
and MLP bias (some Llamas), rope scaling and tied embeddings.  Projections are packed (qkv, gate_up) so each
is one matmul; the loader slices the HF tensors into them.  Every projection goes through ``ops.linear``
(cuBLAS, or a tuned Triton kernel for decode batches; the MLP's SiLU-and-multiply is fused into its gate/up
matmul).  The KV cache is handed in per call, so the forward has no hidden state besides weights and is
traced unchanged by the graph compiler.

Compile time: each layer is two nested compile regions (``torch.compiler.nested_compile_region``) around the
KV store and attention, so the compiler lowers the layer's code once and reuses it for every layer instead of
lowering ``num_layers`` copies.  The store and attention ops stay outside the regions because a region may not
mutate its inputs (``store_kv`` writes the cache).  In eager mode the regions are plain calls.
"""
from dataclasses import dataclass

import torch
from torch import nn

from nanovllm.engine.step_inputs import StepInputs
from nanovllm.kernels import ops
from nanovllm.layers.norm import RMSNorm
from nanovllm.layers.rotary import RotaryEmbedding


@dataclass
class DecoderArgs:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position: int
    tie_word_embeddings: bool
    qk_norm: bool
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool

    @classmethod
    def from_hf(cls, cfg: dict, qk_norm: bool, qkv_bias: bool | None = None) -> "DecoderArgs":
        rope = dict(cfg.get("rope_parameters") or {})
        rope_theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        attention_bias = bool(cfg.get("attention_bias", False))
        heads = cfg["num_attention_heads"]
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
            num_heads=heads, num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate_size=cfg["intermediate_size"], rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta), rope_scaling=scaling,
            max_position=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)), qk_norm=qk_norm,
            qkv_bias=attention_bias if qkv_bias is None else qkv_bias, o_bias=attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
        )


def _project(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """``linear(x)`` through ``ops.linear``, which takes the tuned Triton kernel for decode-sized batches."""
    return ops.linear(x, linear.weight, linear.bias)


class Attention(nn.Module):
    def __init__(self, a: DecoderArgs, rotary: RotaryEmbedding):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.q_size, self.kv_size = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        self.scale = a.head_dim ** -0.5
        self.qkv_proj = nn.Linear(a.hidden_size, self.q_size + 2 * self.kv_size, bias=a.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, a.hidden_size, bias=a.o_bias)
        self.q_norm = RMSNorm(a.head_dim, a.rms_norm_eps) if a.qk_norm else None
        self.k_norm = RMSNorm(a.head_dim, a.rms_norm_eps) if a.qk_norm else None
        self.rotary = rotary

    def project(self, x, positions):
        """q [T, Hq, D], k and v [T, Hkv, D], normed (Qwen3) and rotated."""
        q, k, v = _project(self.qkv_proj, x).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.reshape(-1, self.num_heads, self.head_dim)
        k = k.reshape(-1, self.num_kv_heads, self.head_dim)
        v = v.reshape(-1, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return (*self.rotary(positions, q, k), v)

    def attend(self, q, k, v, inputs: StepInputs, kv: tuple[torch.Tensor, torch.Tensor]):
        """Store this step's k/v in the paged cache, then attend over it: [T, Hq * D]."""
        k_cache, v_cache = kv
        ops.store_kv(k, v, k_cache, v_cache, inputs.slot_mapping)
        o = ops.paged_attention(q, k_cache, v_cache, inputs.cu_seqlens_q, inputs.context_lens, inputs.block_tables,
                                self.scale)
        return o.reshape(-1, self.q_size)


class MLP(nn.Module):
    def __init__(self, a: DecoderArgs):
        super().__init__()
        self.gate_up_proj = nn.Linear(a.hidden_size, 2 * a.intermediate_size, bias=a.mlp_bias)
        self.down_proj = nn.Linear(a.intermediate_size, a.hidden_size, bias=a.mlp_bias)

    def forward(self, x):
        h = ops.linear(x, self.gate_up_proj.weight, self.gate_up_proj.bias, silu_mul=True)
        return _project(self.down_proj, h)


class DecoderLayer(nn.Module):
    def __init__(self, a: DecoderArgs, rotary: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a, rotary)
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = MLP(a)

    def forward(self, x, inputs, kv):
        q, k, v = _before_attention(self, x, inputs.positions)
        return _after_attention(self, x, self.self_attn.attend(q, k, v, inputs, kv))


def _compile_once(fn):
    """``torch.compiler.nested_compile_region`` where this torch has it (2.8+), else ``fn`` unchanged."""
    region = getattr(torch.compiler, "nested_compile_region", None)
    return region(fn) if region is not None else fn


@_compile_once
def _before_attention(layer: DecoderLayer, x, positions):
    return layer.self_attn.project(layer.input_layernorm(x), positions)


@_compile_once
def _after_attention(layer: DecoderLayer, x, o):
    x = x + _project(layer.self_attn.o_proj, o)
    return x + layer.mlp(layer.post_attention_layernorm(x))


class DecoderBody(nn.Module):
    def __init__(self, a: DecoderArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        rotary = RotaryEmbedding(a.head_dim, a.max_position, a.rope_theta, a.rope_scaling)
        self.layers = nn.ModuleList(DecoderLayer(a, rotary) for _ in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)


class DecoderForCausalLM(nn.Module):
    """Base of the dense architectures.  Subclasses set ``qk_norm`` / ``qkv_bias`` and nothing else."""
    qk_norm = False
    qkv_bias: bool | None = None  # None: follow config's attention_bias
    graph_capturable = True
    not_capturable_reason = ""
    packed_modules = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

    def __init__(self, hf_config: dict):
        super().__init__()
        self.args = a = DecoderArgs.from_hf(hf_config, self.qk_norm, self.qkv_bias)
        self.model = DecoderBody(a)
        self.lm_head = nn.Linear(a.hidden_size, a.vocab_size, bias=False)
        if a.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, inputs: StepInputs, kv_caches: list) -> torch.Tensor:
        """Logits [B, V] for the rows ``inputs.logits_indices`` (one per sequence) of tokens ``input_ids``."""
        x = self.model.embed_tokens(input_ids)
        for layer, kv in zip(self.model.layers, kv_caches):
            x = layer(x, inputs, kv)
        x = self.model.norm(x[inputs.logits_indices])
        return _project(self.lm_head, x)
