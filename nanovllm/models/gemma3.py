"""Gemma 3 (text): the decoder with a sliding window on most layers, as a function of ``StepInputs``.

What differs from the shared decoder (``decoder.py``), each as transformers' ``modeling_gemma3.py`` computes it:
- layers are ``sliding_attention`` (attention over the last ``sliding_window`` tokens, ``ops.paged_attention``'s
  ``window``) or ``full_attention`` (``layer_types``; older configs give ``sliding_window_pattern``, default 6);
- each kind has its own rope table (``rope_parameters[kind]``: local base 10,000, global base and scaling);
- norms are zero-centred (``1 + w``, rounded once: ``ZeroCenteredRMSNorm``), on q and k per head too, and each
  sub-block is normed before and after (four norms a layer);
- the MLP is GeGLU (tanh GELU); embeddings are scaled by sqrt(hidden) rounded to the model's dtype; attention
  scales by ``query_pre_attn_scalar ** -0.5``; optional logit soft-capping of attention scores and of the final
  logits (None in Gemma 3's configs).

Published ``Gemma3ForConditionalGeneration`` checkpoints load their text path (an image is refused by name), text-only
``Gemma3ForCausalLM`` ones as they are; the config is normalised by transformers' ``Gemma3TextConfig``, so old and
new spellings of the rope settings and layer kinds read alike.
"""
import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.kernels import kv_quant, ops
from nanovllm.kernels.norm_rope import apply_rotary
from nanovllm.layers.norm import ZeroCenteredRMSNorm
from nanovllm.layers.rotary import RotaryEmbedding
from nanovllm.models import tensor_parallel as tp
from nanovllm.models.decoder import DecoderArgs, DecoderForCausalLM, _compile_once, project
from nanovllm.step import StepInputs

SLIDING, FULL = "sliding_attention", "full_attention"


def gemma3_text_config(hf_config: dict) -> dict:
    """The text model's config with transformers' defaults filled in and its rope settings per layer kind."""
    from transformers import Gemma3TextConfig
    text = {k: v for k, v in hf_config.items() if k not in ("vision_config", "text_config", "architectures",
                                                             "model_type", "transformers_version")}
    text.update(hf_config.get("text_config") or {})
    text.pop("model_type", None)
    cfg = Gemma3TextConfig(**text).to_dict()
    cfg["tie_word_embeddings"] = bool(hf_config.get("tie_word_embeddings", cfg.get("tie_word_embeddings", True)))
    return cfg


def _rope(cfg: dict, kind: str) -> tuple[float, dict | None]:
    params = dict((cfg.get("rope_parameters") or {}).get(kind) or {})
    theta = float(params.get("rope_theta", 10000.0 if kind == SLIDING else 1e6))
    return theta, (params if params.get("rope_type", "default") != "default" else None)


class GemmaAttention(nn.Module):
    """q/k/v projections packed, zero-centred q/k norms, rope from this layer kind's table, attention over the
    paged cache within ``window`` tokens (0: all of them)."""

    def __init__(self, a: DecoderArgs, window: int, scale: float, softcap: float):
        super().__init__()
        self.num_heads = tp.split(a.num_heads, "num_attention_heads")
        self.num_kv_heads, self.head_dim = tp.kv_heads(a.num_kv_heads)[0], a.head_dim
        self.q_size, self.kv_size = self.num_heads * a.head_dim, self.num_kv_heads * a.head_dim
        self.scale, self.window, self.softcap = scale, window, softcap
        self.qkv_proj = nn.Linear(a.hidden_size, self.q_size + 2 * self.kv_size, bias=a.qkv_bias)
        self.o_proj = nn.Linear(self.q_size, a.hidden_size, bias=a.o_bias)
        self.q_norm = ZeroCenteredRMSNorm(a.head_dim, a.rms_norm_eps)
        self.k_norm = ZeroCenteredRMSNorm(a.head_dim, a.rms_norm_eps)
        self.register_buffer("k_scale", torch.ones(self.num_kv_heads, dtype=torch.float32), persistent=False)
        self.register_buffer("v_scale", torch.ones(self.num_kv_heads, dtype=torch.float32), persistent=False)

    def quant_targets(self) -> list[tuple[nn.Module, str, bool]]:
        return [(self.qkv_proj, "weight", False), (self.o_proj, "weight", True)]

    def attend(self, h, inputs: StepInputs, kv: tuple[torch.Tensor, torch.Tensor], rope: tuple) -> torch.Tensor:
        T, D = h.shape[0], self.head_dim
        k_cache, v_cache = kv
        scales = (self.k_scale, self.v_scale) if kv_quant.is_fp8(k_cache) else (None, None)
        q, k, v = torch.split(project(self.qkv_proj, h, lora_slots=inputs.lora_slots),
                              [self.q_size, self.kv_size, self.kv_size], dim=1)
        q = self.q_norm(q.view(T, self.num_heads, D))
        k = self.k_norm(k.view(T, self.num_kv_heads, D))
        rows, cos, sin = rope
        q, k = apply_rotary(rows, q, k, cos, sin)
        tables, slots = inputs.kv_tables(self.window)  # a sliding layer's: its window pool's, where it has one
        ops.store_kv(k, v.reshape(T, self.num_kv_heads, D), k_cache, v_cache, slots, *scales)
        o = ops.paged_attention(q.contiguous(), k_cache, v_cache, inputs.cu_seqlens_q, inputs.context_lens,
                                tables, self.scale, *scales, window=self.window, softcap=self.softcap)
        return o.reshape(T, self.q_size)


def soft_capped(logits: torch.Tensor, cap: float) -> torch.Tensor:
    """Gemma's final logit soft-capping, ``tanh(logits / cap) * cap``; ``logits`` as they are where ``cap`` is 0."""
    return torch.tanh(logits / cap) * cap if cap else logits


class GeluMLP(nn.Module):
    """GeGLU: ``down(gelu_tanh(gate(x)) * up(x))``, gate and up packed; split over ranks as the dense MLP."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        local = tp.split(intermediate_size, "intermediate_size")
        self.gate_up_proj = nn.Linear(hidden_size, 2 * local, bias=False)
        self.down_proj = nn.Linear(local, hidden_size, bias=False)

    def quant_targets(self) -> list[tuple[nn.Module, str, bool]]:
        return [(self.gate_up_proj, "weight", False), (self.down_proj, "weight", True)]

    def forward(self, x, lora_slots=None):
        gate, up = project(self.gate_up_proj, x, lora_slots=lora_slots).chunk(2, dim=-1)
        return tp.row_parallel(self.down_proj, F.gelu(gate, approximate="tanh") * up, lora_slots)


class Gemma3Layer(nn.Module):
    def __init__(self, a: DecoderArgs, kind: str, attn: GemmaAttention, mlp: GeluMLP):
        super().__init__()
        self.kind = kind
        self.input_layernorm = ZeroCenteredRMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = attn
        self.post_attention_layernorm = ZeroCenteredRMSNorm(a.hidden_size, a.rms_norm_eps)
        self.pre_feedforward_layernorm = ZeroCenteredRMSNorm(a.hidden_size, a.rms_norm_eps)
        self.post_feedforward_layernorm = ZeroCenteredRMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = mlp

    def forward(self, x, h, inputs, kv, next_norm: nn.Module, rope: tuple):
        return _after_attention(self, next_norm, x, self.self_attn.attend(h, inputs, kv, rope), inputs.lora_slots)


@_compile_once
def _after_attention(layer: Gemma3Layer, next_norm: nn.Module, x, o, lora_slots=None):
    x = x + layer.post_attention_layernorm(tp.row_parallel(layer.self_attn.o_proj, o, lora_slots))
    x = x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x), lora_slots))
    return x, next_norm(x)


class Gemma3Body(nn.Module):
    def __init__(self, a: DecoderArgs, rotary: dict, layers: list[Gemma3Layer]):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.rotary = nn.ModuleDict(rotary)
        self.layers = nn.ModuleList(layers)
        self.norm = ZeroCenteredRMSNorm(a.hidden_size, a.rms_norm_eps)


class Gemma3ForCausalLM(DecoderForCausalLM):
    # published multimodal checkpoints: the text model under language_model.model. (transformers 5 reads
    # model.language_model. too)
    checkpoint_prefixes = {"language_model.model.": "model.", "model.language_model.": "model.",
                           "language_model.lm_head.": "lm_head."}

    def __init__(self, hf_config: dict):
        nn.Module.__init__(self)
        cfg = gemma3_text_config(hf_config)
        self.args = a = DecoderArgs.from_hf(dict(cfg, rope_parameters=None), qk_norm=True)
        self.kinds = list(cfg["layer_types"])
        unknown = sorted(set(self.kinds) - {SLIDING, FULL})
        if unknown:
            raise ValueError(f"Gemma 3 layer_types {unknown} are not supported (expected {SLIDING}, {FULL})")
        self.final_softcap = float(cfg.get("final_logit_softcapping") or 0.0)
        scale = float(cfg["query_pre_attn_scalar"]) ** -0.5
        softcap = float(cfg.get("attn_logit_softcapping") or 0.0)
        rotary = {kind: RotaryEmbedding(a.head_dim, a.max_position, *_rope(cfg, kind)) for kind in set(self.kinds)}
        layers = [Gemma3Layer(a, kind, GemmaAttention(a, cfg["sliding_window"] if kind == SLIDING else 0, scale,
                                                      softcap), GeluMLP(a.hidden_size, a.intermediate_size))
                  for kind in self.kinds]
        self.model = Gemma3Body(a, rotary, layers)
        # sqrt(hidden), rounded to the model's dtype when the model is cast (transformers' buffer does the same)
        self.register_buffer("embed_scale", torch.tensor(a.hidden_size ** 0.5), persistent=False)
        self.lm_head = nn.Linear(a.hidden_size, tp.vocab_rows(a.vocab_size), bias=False)
        if a.tie_word_embeddings and self.lm_head.weight.shape == self.model.embed_tokens.weight.shape:
            self.lm_head.weight = self.model.embed_tokens.weight

    def quant_targets(self) -> dict[str, tuple[nn.Module, str, bool]]:
        owners = {id(m): name for name, m in self.named_modules()}
        return {f"{owners[id(module)]}.{attr}": (module, attr, row_parallel)
                for layer in self.model.layers
                for module, attr, row_parallel in layer.self_attn.quant_targets() + layer.mlp.quant_targets()}

    def hidden_states(self, input_ids: torch.Tensor, inputs: StepInputs, kv_caches: list, mm=None) -> torch.Tensor:
        if mm is not None:
            raise ValueError(f"{type(self).__name__} runs text only: image inputs are not supported")
        x = self.model.embed_tokens(input_ids) * self.embed_scale
        ropes = {kind: (r.table_rows(inputs.positions, inputs.context_lens, inputs.cu_seqlens_q), r.cos_cache,
                        r.sin_cache) for kind, r in self.model.rotary.items()}
        layers = self.model.layers
        h = layers[0].input_layernorm(x)
        next_norms = [layer.input_layernorm for layer in layers[1:]] + [self.model.norm]
        for layer, kv, next_norm in zip(layers, kv_caches, next_norms):
            x, h = layer(x, h, inputs, kv, next_norm, ropes[layer.kind])
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return soft_capped(super().logits(h), self.final_softcap)
