"""The hybrid decoders: Gated DeltaNet layers beside gated full-attention layers (``hybrid_layers.py``), three to
one by default, each followed by a dense MLP or a mixture of experts with a sigmoid-gated shared expert.

Families (``architectures``): Qwen3-Next (``Qwen3NextForCausalLM``, fused interleaved GDN projections, MoE) and
Qwen3.5 (``Qwen3_5ForCausalLM`` / ``Qwen3_5MoeForCausalLM``, also a published ``...ForConditionalGeneration``'s
``text_config`` under ``model.language_model.``; ``qwen3_5_vl.py`` adds its vision tower).  Layer i is linear
attention unless ``layer_types[i]`` (default: every ``full_attention_interval``-th) says full attention.  Norms
are zero-centred (``1 + w``); rope turns the first ``partial_rotary_factor`` of each head; Qwen3.5's M-RoPE with
text positions (all three streams equal) is plain rope (image tokens: ``qwen3_5_vl.py``).  Checkpoint ``mtp.*`` tensors (the multi-token-prediction
head) are not used.

Caches: ``kv_caches[i]`` is (K, V) of the paged cache for a full-attention layer and (convolution state, recurrent
state) pools for a linear one (``cache_layout``, sized by ``engine/kv_cache.py``).
"""
import torch
from torch import nn

import nanovllm.distributed as distributed
from nanovllm.layers.norm import ZeroCenteredRMSNorm
from nanovllm.layers.rotary import RotaryEmbedding
from nanovllm.models import tensor_parallel as tp
from nanovllm.models.decoder import MLP, DecoderArgs, DecoderForCausalLM, _compile_once, mlp_add_norm
from nanovllm.models.hybrid_layers import GatedAttention, GatedDeltaNet, LinearArgs
from nanovllm.models.moe import MoeArgs, SparseMoe
from nanovllm.models.qwen3_moe import _is_sparse
from nanovllm.models.qwen_vl import text_config
from nanovllm.step import StepInputs


def layer_types(cfg: dict) -> list[str]:
    """Each layer's kind, "linear_attention" or "full_attention", from the config (checked)."""
    n = cfg["num_hidden_layers"]
    types = cfg.get("layer_types") or ["full_attention" if (i + 1) % cfg.get("full_attention_interval", 4) == 0
                                       else "linear_attention" for i in range(n)]
    bad = sorted({t for t in types} - {"linear_attention", "full_attention"})
    if len(types) != n or bad:
        raise ValueError(f"config layer_types must name {n} layers, each 'linear_attention' or 'full_attention'; "
                         f"got {len(types)} with {bad or 'no'} unknown kinds")
    return list(types)


class HybridLayer(nn.Module):
    def __init__(self, a: DecoderArgs, kind: str, mixer: nn.Module, mlp: nn.Module):
        super().__init__()
        self.kind = kind
        self.input_layernorm = ZeroCenteredRMSNorm(a.hidden_size, a.rms_norm_eps)
        self.post_attention_layernorm = ZeroCenteredRMSNorm(a.hidden_size, a.rms_norm_eps)
        if kind == "linear_attention":
            self.linear_attn = mixer
        else:
            self.self_attn = mixer
        self.mlp = mlp

    @property
    def mixer(self) -> nn.Module:
        return self.linear_attn if self.kind == "linear_attention" else self.self_attn

    def forward(self, x, h, inputs: StepInputs, cache: tuple, next_norm: nn.Module, rope: tuple):
        """As ``DecoderLayer.forward``: the new residual x, and it through ``next_norm``."""
        if self.kind == "linear_attention":
            o, out = self.linear_attn.mix(h, inputs, cache), self.linear_attn.out_proj
        else:
            o, out = self.self_attn.mix(h, inputs, cache, rope), self.self_attn.o_proj
        return _after_mixer(out, self, next_norm, x, o)


@_compile_once
def _after_mixer(out_proj: nn.Linear, layer: HybridLayer, next_norm: nn.Module, x, o):
    x, h = tp.row_parallel_add_norm(out_proj, o, x, layer.post_attention_layernorm)
    return mlp_add_norm(layer.mlp, h, x, next_norm)


class HybridBody(nn.Module):
    def __init__(self, a: DecoderArgs, rotary_dim: int, layers: list[HybridLayer]):
        super().__init__()
        self.embed_tokens = nn.Embedding(a.vocab_size, a.hidden_size)
        self.rotary = RotaryEmbedding(rotary_dim, a.max_position, a.rope_theta, a.rope_scaling)
        self.layers = nn.ModuleList(layers)
        self.norm = ZeroCenteredRMSNorm(a.hidden_size, a.rms_norm_eps)


class HybridForCausalLM(DecoderForCausalLM):
    """Qwen3-Next's layout; the Qwen3.5 classes below change the projections and the names."""
    interleaved_projections = True
    always_sparse = False  # Qwen3.5-MoE: every layer's MLP is a mixture of experts
    packed_modules = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    expert_weights = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
                      "down_proj": ("down_proj", None)}
    checkpoint_prefixes: dict = {}

    def __init__(self, hf_config: dict):
        nn.Module.__init__(self)
        cfg = text_config(hf_config)  # a published multimodal checkpoint's text part (M-RoPE: plain rope on text)
        cfg.setdefault("intermediate_size", cfg.get("moe_intermediate_size"))  # an all-MoE config names none
        self.args = a = DecoderArgs.from_hf(cfg, qk_norm=True)
        self.kinds = layer_types(cfg)
        whole = LinearArgs.from_hf(cfg)
        self.linear = whole.local(distributed.current().size)  # this rank's heads (tensor_parallel.py)
        rope = cfg.get("rope_parameters") or {}
        factor = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))
        rotary_dim = int(a.head_dim * factor)
        layers = []
        for i, kind in enumerate(self.kinds):
            if kind == "linear_attention":
                mixer = GatedDeltaNet(a.hidden_size, self.linear, a.rms_norm_eps, self.interleaved_projections, whole)
            else:
                mixer = GatedAttention(a.hidden_size, tp.split(a.num_heads, "num_attention_heads"),
                                       tp.kv_heads(a.num_kv_heads)[0], a.head_dim, rotary_dim, a.rms_norm_eps,
                                       a.qkv_bias)
            layers.append(HybridLayer(a, kind, mixer, self.make_mlp(cfg, i)))
        self.model = HybridBody(a, rotary_dim, layers)
        self.lm_head = nn.Linear(a.hidden_size, tp.vocab_rows(a.vocab_size), bias=False)
        if a.tie_word_embeddings and self.lm_head.weight.shape == self.model.embed_tokens.weight.shape:
            self.lm_head.weight = self.model.embed_tokens.weight  # else tie_lm_head copies this rank's rows

    def make_mlp(self, cfg: dict, layer_idx: int) -> nn.Module:
        a = self.args
        if not (self.always_sparse or _is_sparse(cfg, layer_idx)):
            return MLP(a.hidden_size, a.intermediate_size, a.mlp_bias)
        moe = MoeArgs.from_hf(cfg, experts_keys=("num_experts",), intermediate_key="moe_intermediate_size",
                              renormalize=self.always_sparse or cfg.get("norm_topk_prob", False),
                              shared_key="shared_expert_intermediate_size", round_weights=True)
        return SparseMoe(a.hidden_size, moe)

    def after_loading(self) -> None:
        """Under tensor parallelism: each linear-attention layer keeps its rank's convolution channels."""
        rank = distributed.current().rank
        for layer in self.model.layers:
            if layer.kind == "linear_attention":
                layer.linear_attn.keep_rank_channels(rank)

    def chain_rows(self, rows: int) -> None:
        """Let a step chain up to ``rows`` rows of one sequence (speculative decoding's verify steps), before the
        step is compiled."""
        for layer in self.model.layers:
            if layer.kind == "linear_attention":
                layer.linear_attn.max_chain = rows

    def cache_layout(self) -> list[tuple | None]:
        """Per layer: None for full attention (paged KV), else the shapes per slot of its (convolution state,
        recurrent state) pools."""
        return [None if kind == "full_attention" else self.linear.state_shapes() for kind in self.kinds]

    def attention_layer(self) -> GatedAttention:
        """One full-attention layer (the KV cache's heads and head size)."""
        return next(layer.self_attn for layer in self.model.layers if layer.kind == "full_attention")

    def packed_sizes(self, target: str, rows: int) -> list[int]:
        """Rows of each checkpoint part of packed parameter ``target`` (``placement.py``)."""
        if ".qkv_proj." in target:
            return self.get_submodule(target.rsplit(".", 2)[0]).packed_sizes()
        return [rows // 2] * 2

    def quant_targets(self) -> dict[str, tuple[nn.Module, str, bool]]:
        owners = {id(m): name for name, m in self.named_modules()}
        out = {}
        for layer in self.model.layers:
            mlp = getattr(layer.mlp, "quant_targets", None)
            for module, attr, row_parallel in layer.mixer.quant_targets() + (mlp() if mlp else []):
                out[f"{owners[id(module)]}.{attr}"] = (module, attr, row_parallel)
        return out

    def hidden_states(self, input_ids: torch.Tensor, inputs: StepInputs, kv_caches: list, mm=None) -> torch.Tensor:
        if mm is not None:
            raise ValueError(f"{type(self).__name__} runs text only: image inputs are not supported")
        rotary = self.model.rotary
        return self.run_layers(self.model.embed_tokens(input_ids), inputs, kv_caches,
                               (inputs.positions, rotary.cos_cache, rotary.sin_cache))

    def run_layers(self, x: torch.Tensor, inputs: StepInputs, kv_caches: list, rope: tuple,
                   layer_adds: tuple = ()) -> torch.Tensor:
        assert not layer_adds, "hybrid models take no per-layer additions"
        layers = self.model.layers
        h = layers[0].input_layernorm(x)
        next_norms = [layer.input_layernorm for layer in layers[1:]] + [self.model.norm]
        for layer, cache, next_norm in zip(layers, kv_caches, next_norms):
            x, h = layer(x, h, inputs, cache, next_norm, rope)
        return h


class Qwen3NextForCausalLM(HybridForCausalLM):
    """Qwen3-Next: the base layout."""


class Qwen3_5ForCausalLM(HybridForCausalLM):
    interleaved_projections = False
    checkpoint_prefixes = {"model.language_model.": "model."}


class Qwen3_5MoeForCausalLM(Qwen3_5ForCausalLM):
    always_sparse = True
