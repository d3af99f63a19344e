"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): the Qwen3 decoder (q/k RMSNorm, no qkv bias) whose MLPs are
mixtures of experts (``moe.py``), except in dense layers.

Layer ``i`` is sparse when ``i`` is not in ``mlp_only_layers``, the config has experts and ``(i + 1)`` is a multiple
of ``decoder_sparse_step``; a dense layer has an MLP of ``intermediate_size``.  Experts have
``moe_intermediate_size``; each token takes ``num_experts_per_tok`` of ``num_experts`` (transformers 5 writes it
``num_local_experts``), renormalised when ``norm_topk_prob`` is set.

Checkpoint names: ``mlp.gate.weight`` (router), ``mlp.experts.<e>.{gate,up,down}_proj.weight`` (stacked).
"""
from nanovllm.models.decoder import DecoderForCausalLM
from nanovllm.models.moe import MoeArgs, SparseMoe


class Qwen3MoeForCausalLM(DecoderForCausalLM):
    qk_norm = True
    expert_weights = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
                      "down_proj": ("down_proj", None)}
    shared_expert_key: str | None = None  # Qwen2-MoE's shared expert

    def make_mlp(self, hf_config: dict, layer_idx: int):
        if not _is_sparse(hf_config, layer_idx):
            return super().make_mlp(hf_config, layer_idx)
        moe = MoeArgs.from_hf(hf_config, experts_keys=("num_experts", "num_local_experts"),
                              intermediate_key="moe_intermediate_size",
                              renormalize=hf_config.get("norm_topk_prob", False),
                              shared_key=self.shared_expert_key, round_weights=True)
        return SparseMoe(self.args.hidden_size, moe)


def _is_sparse(cfg: dict, layer_idx: int) -> bool:
    step = cfg.get("decoder_sparse_step", 1)
    if not isinstance(step, int) or step < 1:
        raise ValueError(f"config decoder_sparse_step={step!r} must be a positive int")
    num_experts = cfg.get("num_experts", cfg.get("num_local_experts")) or 0
    return layer_idx not in (cfg.get("mlp_only_layers") or []) and num_experts > 0 and (layer_idx + 1) % step == 0
