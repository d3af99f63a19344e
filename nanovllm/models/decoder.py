"""The decoder-only transformer that every architecture shares, as a function of ``StepInputs``.

Variants differ in flags read from the HF config: q/k RMSNorm (Qwen3), qkv bias (Qwen2), attention and MLP
bias (some Llamas), rope scaling and tied embeddings; in each layer's attention (``attention_options``: a sliding
window, sinks) and MLP (``make_mlp``): dense, or a mixture of experts (``moe.py``); and a subclass may rewrite its
weights once loaded (``after_loading``: MiniCPM folds its scalings into them).  Projections are packed (qkv,
gate_up) so each is one matmul; the loader slices the HF tensors into them.  Every projection goes through
``ops.linear`` or, for an int4 weight, ``ops.linear_int4`` (the MLP's SiLU-and-multiply fused into its gate/up
matmul).  The KV cache is handed in per call, so the forward has no hidden state besides weights and is traced
unchanged by the graph compiler.

A layer is: the qkv matmul, one fused op for the q/k norm, rope and KV store (``ops.rope_store_kv``), attention,
then everything after attention as one nested compile region that the compiler lowers once for every layer.  The
region ends with the next layer's input norm (or the final norm), so the residual add and that norm fuse into one
kernel.  In eager mode the region is a plain call.
"""
from dataclasses import dataclass

import torch
from torch import nn

import nanovllm.distributed as distributed
from nanovllm.step import StepInputs
from nanovllm.kernels import kv_quant, ops
from nanovllm.layers.norm import RMSNorm
from nanovllm.layers.rotary import RotaryEmbedding
from nanovllm.models import lora_targets, tensor_parallel as tp


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
        if scaling and cfg.get("original_max_position_embeddings"):  # top level wins, as in transformers (Phi-3)
            scaling = dict(scaling, original_max_position_embeddings=cfg["original_max_position_embeddings"])
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


def project(linear: nn.Linear, x: torch.Tensor, bias: bool = True, silu_mul: bool = False,
            lora_slots: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(x)`` through ``ops.linear`` (the tuned Triton kernel for decode-sized batches), with the weight's
    FP8 scales where it has them (``quant/fp8_weights.py``), or ``ops.linear_int4`` for an int4 weight
    (``quant/int4_weights.py``); ``bias=False`` leaves the bias out; LoRA adapters by ``lora_slots``
    (``tp.matmul``)."""
    return tp.matmul(linear, x, linear.bias if bias else None, silu_mul, lora_slots)


class Attention(nn.Module):
    """``window`` > 0: each query sees its last ``window`` keys only (a sliding-window layer); ``sinks``: a learned
    logit per query head in the softmax denominator (the parameter ``sinks``, this rank's heads; GPT-OSS)."""

    def __init__(self, a: DecoderArgs, rotary: RotaryEmbedding, window: int = 0, sinks: bool = False):
        super().__init__()
        self.num_heads = tp.split(a.num_heads, "num_attention_heads")  # this rank's (tensor_parallel.py)
        self.num_kv_heads, self.head_dim = tp.kv_heads(a.num_kv_heads)[0], a.head_dim
        self.q_size, self.kv_size = self.num_heads * a.head_dim, self.num_kv_heads * a.head_dim
        self.scale = a.head_dim ** -0.5
        self.qkv_proj = nn.Linear(a.hidden_size, self.q_size + 2 * self.kv_size, bias=a.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, a.hidden_size, bias=a.o_bias)
        self.eps = a.rms_norm_eps
        self.q_norm = RMSNorm(a.head_dim, a.rms_norm_eps) if a.qk_norm else None
        self.k_norm = RMSNorm(a.head_dim, a.rms_norm_eps) if a.qk_norm else None
        self.rotary = rotary
        self.window = window
        self.sinks = nn.Parameter(torch.empty(self.num_heads)) if sinks else None
        # An FP8 KV cache's per-head scales (kernels/kv_quant.py), float32 in any model dtype: 1 until the
        # checkpoint or calibration sets them (models/kv_scales.py).
        self.register_buffer("k_scale", torch.ones(self.num_kv_heads, dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones(self.num_kv_heads, dtype=torch.float32), persistent=False)

    def quant_targets(self) -> list[tuple[nn.Module, str, bool]]:
        """(module, parameter, row-parallel) of what a weight quantization holds (``DecoderForCausalLM``'s)."""
        return [(self.qkv_proj, "weight", False), (self.o_proj, "weight", True)]

    def attend(self, h, inputs: StepInputs, kv: tuple[torch.Tensor, torch.Tensor], rope: tuple):
        """Project ``h``, norm (Qwen3) and rotate q and k (``rope``: each token's row of the cos and sin tables),
        store k and v in the paged cache, then attend over it: [T, Hq * D].  Everything between the qkv matmul
        and attention is one fused op (``ops.rope_store_kv``)."""
        k_cache, v_cache = kv
        scales = (self.k_scale, self.v_scale) if kv_quant.is_fp8(k_cache) else (None, None)
        rows, cos, sin = rope
        tables, slots = inputs.kv_tables(self.window)  # a sliding layer's: its window pool's, where it has one
        q = ops.rope_store_kv(project(self.qkv_proj, h, lora_slots=inputs.lora_slots), rows, cos, sin,
                              self.q_norm.weight if self.q_norm is not None else None,
                              self.k_norm.weight if self.k_norm is not None else None, self.eps, k_cache, v_cache,
                              slots, self.num_heads, self.num_kv_heads, *scales)
        o = ops.paged_attention(q, k_cache, v_cache, inputs.cu_seqlens_q, inputs.context_lens, tables,
                                self.scale, *scales, window=self.window, sinks=self.sinks)
        return o.reshape(-1, self.q_size)


class MLP(nn.Module):
    """The dense SiLU MLP, gate and up packed into one weight.  Under tensor parallelism each rank holds a slice
    of the intermediate size and the outputs are summed over the group, unless ``reduce`` is False (the caller
    sums them with its own)."""

    def __init__(self, hidden_size: int, intermediate_size: int, bias: bool = False, reduce: bool = True):
        super().__init__()
        local = tp.split(intermediate_size, "intermediate_size")
        self.gate_up_proj = nn.Linear(hidden_size, 2 * local, bias=bias)
        self.down_proj = nn.Linear(local, hidden_size, bias=bias)
        self.reduce = reduce

    def quant_targets(self) -> list[tuple[nn.Module, str, bool]]:
        return [(self.gate_up_proj, "weight", False), (self.down_proj, "weight", True)]

    def activated(self, x, lora_slots=None):
        """silu(gate) * up: the down projection's input."""
        return project(self.gate_up_proj, x, silu_mul=True, lora_slots=lora_slots)

    def forward(self, x, lora_slots=None):
        h = self.activated(x, lora_slots)
        if self.reduce:
            return tp.row_parallel(self.down_proj, h, lora_slots)
        return project(self.down_proj, h, bias=tp.first_rank(), lora_slots=lora_slots)


class DecoderLayer(nn.Module):
    def __init__(self, a: DecoderArgs, rotary: RotaryEmbedding, mlp: nn.Module, attention: dict | None = None):
        super().__init__()
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = Attention(a, rotary, **(attention or {}))
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = mlp  # [T, H] -> [T, H]: MLP, or a mixture of experts (moe.py)

    def forward(self, x, h, inputs, kv, next_norm: RMSNorm, rope: tuple):
        """x: the residual stream; h: x through this layer's input norm.  Returns the new x, and it through
        ``next_norm`` (the next layer's input norm, or the final norm), so that norm fuses into this layer."""
        return _after_attention(self, next_norm, x, self.self_attn.attend(h, inputs, kv, rope), inputs.lora_slots)


def _compile_once(fn):
    """``torch.compiler.nested_compile_region`` where this torch has it (2.8+), else ``fn`` unchanged.

    The compiler lowers the region once and reuses it for every layer instead of lowering ``num_layers`` copies.
    The ops before attention stay outside it because a region may not mutate its inputs (the store writes the
    cache)."""
    region = getattr(torch.compiler, "nested_compile_region", None)
    return region(fn) if region is not None else fn


@_compile_once
def _after_attention(layer: DecoderLayer, next_norm: RMSNorm, x, o, lora_slots=None):
    x, h = tp.row_parallel_add_norm(layer.self_attn.o_proj, o, x, layer.post_attention_layernorm, lora_slots)
    return mlp_add_norm(layer.mlp, h, x, next_norm, lora_slots)


def mlp_add_norm(mlp: nn.Module, h, x, next_norm: nn.Module, lora_slots=None):
    """``(x + mlp(h), next_norm of it)``, the MLP's (or a MoE block's) sum over the ranks fused with the add and
    the norm where ``tensor_parallel.sum_add_norm`` fuses them."""
    if isinstance(mlp, MLP) and mlp.reduce:  # its down projection's sum
        return tp.row_parallel_add_norm(mlp.down_proj, mlp.activated(h, lora_slots), x, next_norm, lora_slots)
    if getattr(mlp, "reducible", False):  # a MoE block's part before its sum
        return tp.sum_add_norm(mlp(h, reduce=False), x, next_norm)
    x = x + (mlp(h, lora_slots) if isinstance(mlp, MLP) else mlp(h))  # MoE blocks: no adapters
    return x, next_norm(x)


class DecoderBody(nn.Module):
    def __init__(self, a: DecoderArgs, mlps: list[nn.Module], attention: list[dict] | None = None):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.rotary = rotary = RotaryEmbedding(a.head_dim, a.max_position, a.rope_theta, a.rope_scaling)
        attention = attention or [{}] * len(mlps)
        self.layers = nn.ModuleList(DecoderLayer(a, rotary, mlp, kw) for mlp, kw in zip(mlps, attention))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)


class DecoderForCausalLM(nn.Module):
    """Base of every architecture.  Dense subclasses set ``qk_norm`` / ``qkv_bias``, and may read more of the
    config and override ``after_loading``; mixture-of-experts ones also override ``make_mlp`` and declare their
    checkpoint names (``loader.py``)."""
    qk_norm = False
    qkv_bias: bool | None = None  # None: follow config's attention_bias
    graph_capturable = True
    not_capturable_reason = ""
    packed_modules = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}

    def __init__(self, hf_config: dict):
        super().__init__()
        self.args = a = DecoderArgs.from_hf(hf_config, self.qk_norm, self.qkv_bias)
        self.model = DecoderBody(a, [self.make_mlp(hf_config, i) for i in range(a.num_layers)],
                                 [self.attention_options(hf_config, i) for i in range(a.num_layers)])
        self.lm_head = nn.Linear(a.hidden_size, tp.vocab_rows(a.vocab_size), bias=False)
        if a.tie_word_embeddings and self.lm_head.weight.shape == self.model.embed_tokens.weight.shape:
            self.lm_head.weight = self.model.embed_tokens.weight  # else tie_lm_head copies this rank's rows

    def layer_windows(self) -> list[int]:
        """Each layer's sliding window (0: full attention; GPT-OSS, Gemma 3).  The engine keeps the sliding layers'
        KV in a pool of its own, from which their attention reads through ``StepInputs.kv_tables``."""
        return [getattr(getattr(layer, "self_attn", None), "window", 0) for layer in self.model.layers]

    def quant_targets(self) -> dict[str, tuple[nn.Module, str, bool]]:
        """Every parameter a weight quantization holds (``nanovllm/quant/``), by name: (its module, its attribute,
        whether tensor parallelism splits its input columns).  The decoder layers' attention projections and their
        MLP's (``quant_targets`` of a dense MLP or a ``SparseMoe``: stacked experts, shared expert); embeddings,
        the LM head, norms, routers and vision towers stay in the model's dtype."""
        owners = {id(m): name for name, m in self.named_modules()}
        out = {}
        for layer in (m for m in self.modules() if isinstance(m, DecoderLayer)):
            mlp = getattr(layer.mlp, "quant_targets", None)
            for module, attr, row_parallel in layer.self_attn.quant_targets() + (mlp() if mlp else []):
                out[f"{owners[id(module)]}.{attr}"] = (module, attr, row_parallel)
        return out

    def lora_targets(self) -> list[list[lora_targets.Target]]:
        """Per layer, the projections LoRA adapters run on (``lora_targets.py``): packed q/k/v, o, and the dense
        MLP's gate/up and down (``ValueError`` for a mixture of experts); ``lora/pool.py`` serves listed families."""
        return [lora_targets.attention(layer.self_attn, self.args.num_kv_heads) + lora_targets.mlp(layer.mlp)
                for layer in self.model.layers]

    def attention_options(self, hf_config: dict, layer_idx: int) -> dict:
        """Layer ``layer_idx``'s ``Attention`` keywords (``self.args`` is set): none, full causal attention."""
        return {}

    def make_mlp(self, hf_config: dict, layer_idx: int) -> nn.Module:
        """Layer ``layer_idx``'s MLP (``self.args`` is set): the dense one of ``intermediate_size``."""
        a = self.args
        return MLP(a.hidden_size, a.intermediate_size, a.mlp_bias)

    @torch.no_grad()
    def tie_lm_head(self) -> None:
        """Under tensor parallelism with tied embeddings: this rank's vocabulary rows of the embedding (zeros for
        the padding) into its LM head shard.  Called by the loader before ``after_loading``."""
        w = self.lm_head.weight
        if w is self.model.embed_tokens.weight or not self.args.tie_word_embeddings:
            return
        start = distributed.current().rank * w.shape[0]
        rows = self.model.embed_tokens.weight[start:start + w.shape[0]]
        w.zero_()
        w[:rows.shape[0]].copy_(rows)

    def after_loading(self) -> None:
        """Called once the weights are filled (from a checkpoint or at random), before the first step: a subclass
        may rewrite them here (MiniCPM folds its scalings into them).  Nothing to do for the plain decoder."""

    def forward(self, input_ids: torch.Tensor, inputs: StepInputs, kv_caches: list, mm=None) -> torch.Tensor:
        """Logits [B, V] for the rows ``inputs.logits_indices`` (one per sequence) of tokens ``input_ids``; ``mm``:
        a vision-language model's extra inputs (``hidden_states``)."""
        return self.logits(self.hidden_states(input_ids, inputs, kv_caches, mm)[inputs.logits_indices])

    def hidden_states(self, input_ids: torch.Tensor, inputs: StepInputs, kv_caches: list, mm=None) -> torch.Tensor:
        """The final normed hidden states [T, H] of every token (``logits`` turns rows of them into logits).  The
        plain decoder takes no ``mm``; a vision-language model overrides this to use it."""
        assert mm is None, f"{type(self).__name__} takes no multimodal inputs"
        rotary = self.model.rotary
        rows = rotary.table_rows(inputs.positions, inputs.context_lens, inputs.cu_seqlens_q)
        return self.run_layers(self.model.embed_tokens(input_ids), inputs, kv_caches,
                               (rows, rotary.cos_cache, rotary.sin_cache))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head on hidden states ``h`` [n, H]: logits [n, V], gathered over the tensor-parallel ranks."""
        return tp.gather_logits(project(self.lm_head, h), self.args.vocab_size)

    def run_layers(self, x: torch.Tensor, inputs: StepInputs, kv_caches: list, rope: tuple,
                   layer_adds: tuple = ()) -> torch.Tensor:
        """The final normed hidden states [T, H] from the input embeddings ``x`` [T, H].  ``rope`` is (each token's
        row in the cos and sin tables, the tables); ``layer_adds`` (vision-language models) is (token rows,
        features [n, H] per layer): layer i's output gains ``layer_adds[1][i]`` at those rows."""
        layers = self.model.layers
        h = layers[0].input_layernorm(x)
        next_norms = [layer.input_layernorm for layer in layers[1:]] + [self.model.norm]
        for i, (layer, kv, next_norm) in enumerate(zip(layers, kv_caches, next_norms)):
            x, h = layer(x, h, inputs, kv, next_norm, rope)
            if layer_adds and i < len(layer_adds[1]):
                x = x.index_add(0, layer_adds[0], layer_adds[1][i].to(x.dtype))
                h = next_norm(x)
        return h  # the norm is per row: a caller selects the rows it needs after it
