"""Qwen2-MoE (Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B): Qwen3-MoE's layer rule and experts on the Qwen2 decoder (qkv
bias unless the config sets ``qkv_bias`` false, no q/k norm), plus a shared expert of
``shared_expert_intermediate_size`` added to every sparse layer's output, scaled by
``sigmoid(shared_expert_gate(x))``.  Top-k probabilities are renormalised only when ``norm_topk_prob`` is set (off in
the released checkpoints).

Checkpoint names: Qwen3-MoE's, plus ``mlp.shared_expert.{gate,up,down}_proj.weight`` and
``mlp.shared_expert_gate.weight``.
"""
from nanovllm.models.qwen3_moe import Qwen3MoeForCausalLM


class Qwen2MoeForCausalLM(Qwen3MoeForCausalLM):
    qk_norm = False
    shared_expert_key = "shared_expert_intermediate_size"

    def __init__(self, hf_config: dict):
        self.qkv_bias = bool(hf_config.get("qkv_bias", True))  # transformers' Qwen2MoeConfig field, default True
        super().__init__(hf_config)
