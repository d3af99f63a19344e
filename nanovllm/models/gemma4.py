"""Gemma 4 (text): Gemma 3's sliding/full decoder with per-layer inputs and KV shared across layers, as a function of
``StepInputs``; each difference as transformers' ``modeling_gemma4.py`` computes it (layers: ``gemma4_layers.py``).

- per-layer inputs: ``embed_tokens_per_layer`` (scaled by sqrt(its width)) plus the normed projection of the
  embeddings, times 2 ** -0.5, one slice per layer, fed in after its MLP;
- full layers have their own head size and KV heads (``per_layer_config``, so the cache is sized per layer:
  ``layer_kv_shapes``), and rope table (``proportional``, partly rotated); attention scales by 1.0;
- KV sharing: the last ``num_kv_shared_layers`` layers compute no K/V and keep no cache; each reads the cache of the
  last earlier layer of its kind (``kv_sources``), so sharing saves their cache memory as in transformers;
- ``use_double_wide_mlp``: shared layers' MLP twice as wide; ``enable_moe_block``: a MoE block beside every MLP.
q, k and v are separate matmuls (a full layer with ``attention_k_eq_v`` has no v), each with its LoRA adapters
(``lora_targets``), as o and the MLP's projections. Published ``Gemma4ForConditionalGeneration`` checkpoints load
their text path (an image is refused by name), ``Gemma4ForCausalLM`` ones as they are; the config is normalised by
transformers' ``Gemma4TextConfig``.
"""
import torch
from torch import nn

from nanovllm.models import lora_targets, tensor_parallel as tp
from nanovllm.models.decoder import DecoderArgs, DecoderForCausalLM, project
from nanovllm.models.gemma3 import GeluMLP, soft_capped
from nanovllm.models.gemma4_layers import Gemma4Attention, Gemma4Layer, Gemma4Norm, rope_tables
from nanovllm.step import StepInputs

SLIDING, FULL = "sliding_attention", "full_attention"
_NOT_TEXT = ("vision_config", "audio_config", "text_config", "architectures", "model_type", "transformers_version")


def gemma4_text_config(hf_config: dict):
    """transformers' ``Gemma4TextConfig`` of the text model (defaults, per-layer overrides, sharing modes)."""
    from transformers import Gemma4TextConfig
    text = dict(hf_config.get("text_config") or {k: v for k, v in hf_config.items() if k not in _NOT_TEXT})
    text.pop("model_type", None)
    text["tie_word_embeddings"] = bool(hf_config.get("tie_word_embeddings", text.get("tie_word_embeddings", True)))
    return Gemma4TextConfig(**text)


def kv_sources(cfg) -> list[int | None]:
    """Per layer: None where it computes its own K/V, else the layer whose cache it reads (the last layer of its
    kind before the shared ones, as transformers' ``kv_sharing_modes``)."""
    n, shared = cfg.num_hidden_layers, cfg.num_kv_shared_layers or 0
    if shared >= n:
        raise ValueError(f"Gemma 4 num_kv_shared_layers={shared} leaves no layer to compute K/V ({n} layers)")
    first, kinds = n - shared, list(cfg.layer_types)
    out = []
    for i, kind in enumerate(kinds):
        if i < first:
            out.append(None)
            continue
        earlier = [j for j in range(first) if kinds[j] == kind]
        if not earlier:
            raise ValueError(f"Gemma 4 layer {i} shares the K/V of a {kind} layer, but none comes before layer {first}")
        out.append(earlier[-1])
    return out


class Gemma4Body(nn.Module):
    def __init__(self, a: DecoderArgs, per_layer_dim: int, per_layer_vocab: int, layers: list[Gemma4Layer]):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        if per_layer_dim:
            self.embed_tokens_per_layer = nn.Embedding(per_layer_vocab, a.num_layers * per_layer_dim)
            self.per_layer_model_projection = nn.Linear(a.hidden_size, a.num_layers * per_layer_dim, bias=False)
            self.per_layer_projection_norm = Gemma4Norm(per_layer_dim, a.rms_norm_eps)
        self.layers = nn.ModuleList(layers)
        self.norm = Gemma4Norm(a.hidden_size, a.rms_norm_eps)


class Gemma4ForCausalLM(DecoderForCausalLM):
    checkpoint_prefixes = {"model.language_model.": "model.", "language_model.model.": "model.",
                           "language_model.lm_head.": "lm_head."}
    packed_modules = {"gate_up_proj": ("gate_proj", "up_proj")}
    emulate_precision_casts = True  # graph mode rounds as eager does (compile/factory.round_like_eager)

    def __init__(self, hf_config: dict):
        nn.Module.__init__(self)
        cfg = gemma4_text_config(hf_config)
        self.args = a = DecoderArgs.from_hf(dict(cfg.to_dict(), rope_parameters=None), qk_norm=True)
        self.kinds = list(cfg.layer_types)
        unknown = sorted(set(self.kinds) - {SLIDING, FULL})
        if unknown:
            raise ValueError(f"Gemma 4 layer_types {unknown} are not supported (expected {SLIDING}, {FULL})")
        if cfg.use_bidirectional_attention:
            raise ValueError(f"Gemma 4 use_bidirectional_attention={cfg.use_bidirectional_attention!r} is not "
                             f"supported (causal text only)")
        self.final_softcap = float(cfg.final_logit_softcapping or 0.0)
        self.sources = kv_sources(cfg)
        self.per_layer_dim = pld = cfg.hidden_size_per_layer_input or 0
        moe = (cfg.num_experts, cfg.top_k_experts, cfg.moe_intermediate_size) if cfg.enable_moe_block else None
        layers = []
        for i, kind in enumerate(self.kinds):
            lc, shared = cfg.per_layer_config[i], self.sources[i] is not None
            attn = Gemma4Attention(a.hidden_size, a.num_heads, lc.num_key_value_heads, lc.head_dim, a.rms_norm_eps,
                                   cfg.sliding_window if kind == SLIDING else 0, cfg.attention_k_eq_v and kind == FULL,
                                   shared, cfg.attention_bias)
            wide = 2 if cfg.use_double_wide_mlp and shared else 1
            layers.append(Gemma4Layer(a.hidden_size, a.rms_norm_eps, kind, attn,
                                      GeluMLP(a.hidden_size, wide * a.intermediate_size), pld, moe))
        self.model = Gemma4Body(a, pld, cfg.vocab_size_per_layer_input, layers)
        for kind in set(self.kinds):
            cos, sin = rope_tables(cfg.per_layer_config[kind].head_dim, a.max_position, cfg.rope_parameters[kind])
            self.register_buffer(f"{kind}_cos", cos, persistent=False)
            self.register_buffer(f"{kind}_sin", sin, persistent=False)
        # sqrt(width), rounded to the model's dtype when the model is cast (transformers' buffers do the same)
        self.register_buffer("embed_scale", torch.tensor(a.hidden_size ** 0.5), persistent=False)
        self.register_buffer("per_layer_embed_scale", torch.tensor(float(pld) ** 0.5), persistent=False)
        self.lm_head = nn.Linear(a.hidden_size, tp.vocab_rows(a.vocab_size), bias=False)
        if a.tie_word_embeddings and self.lm_head.weight.shape == self.model.embed_tokens.weight.shape:
            self.lm_head.weight = self.model.embed_tokens.weight

    def layer_kv_shapes(self) -> list[tuple[int, int] | None]:
        """Per layer (KV heads, head size) of its cache; None for a KV-shared layer (it keeps none)."""
        return [None if src is not None else (layer.self_attn.num_kv_heads, layer.self_attn.head_dim)
                for layer, src in zip(self.model.layers, self.sources)]

    def lora_targets(self) -> list[list[lora_targets.Target]]:
        """The decoder's, with each layer's own KV heads and q, k and v separate (a shared layer's k/v, and v where K
        is V, absent as in transformers, so PEFT adapts none); the MoE block's experts take none (PEFT targets none)."""
        return [lora_targets.attention(layer.self_attn, layer.self_attn.total_kv_heads) + lora_targets.mlp(layer.mlp)
                for layer in self.model.layers]

    def quant_targets(self) -> dict[str, tuple[nn.Module, str, bool]]:
        owners = {id(m): name for name, m in self.named_modules()}
        return {f"{owners[id(module)]}.{attr}": (module, attr, row_parallel)
                for layer in self.model.layers
                for module, attr, row_parallel in layer.self_attn.quant_targets() + layer.mlp.quant_targets()}

    def per_layer_inputs(self, input_ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """[T, layers, width]: the token's per-layer embedding and the embeddings' normed projection, averaged."""
        m, T = self.model, input_ids.shape[0]
        tokens = (m.embed_tokens_per_layer(input_ids) * self.per_layer_embed_scale).view(T, self.args.num_layers, -1)
        proj = project(m.per_layer_model_projection, x) * self.args.hidden_size ** -0.5
        proj = m.per_layer_projection_norm(proj.view(T, self.args.num_layers, -1))
        return (proj + tokens) * 2.0 ** -0.5

    def hidden_states(self, input_ids: torch.Tensor, inputs: StepInputs, kv_caches: list, mm=None) -> torch.Tensor:
        if mm is not None:
            raise ValueError(f"{type(self).__name__} runs text only: image inputs are not supported")
        x = self.model.embed_tokens(input_ids) * self.embed_scale
        ple = self.per_layer_inputs(input_ids, x) if self.per_layer_dim else None
        ropes = {kind: (inputs.positions, getattr(self, f"{kind}_cos"), getattr(self, f"{kind}_sin"))
                 for kind in set(self.kinds)}
        layers = self.model.layers
        h = layers[0].input_layernorm(x)
        next_norms = [layer.input_layernorm for layer in layers[1:]] + [self.model.norm]
        for i, (layer, next_norm, src) in enumerate(zip(layers, next_norms, self.sources)):
            owner = layers[i if src is None else src].self_attn  # a shared layer reads its source's cache
            x, h = layer(x, h, inputs, kv_caches[i if src is None else src], next_norm, ropes[layer.kind],
                         ple[:, i] if ple is not None else None, (owner.k_scale, owner.v_scale))
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        return soft_capped(super().logits(h), self.final_softcap)
