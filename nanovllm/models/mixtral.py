"""Mixtral (8x7B, 8x22B): the Llama-style decoder (no biases, no q/k norm) with a mixture of experts in every
layer: ``num_local_experts`` experts of ``intermediate_size``, ``num_experts_per_tok`` per token.  Mixtral takes
the top-k router logits, then a softmax over those: the same weights as a softmax over all experts renormalised
over the top k, which is what ``ops.fused_moe`` computes with ``renormalize``.

Checkpoint names: ``block_sparse_moe`` is our ``mlp``; ``block_sparse_moe.gate.weight`` (router) and
``block_sparse_moe.experts.<e>.{w1,w3,w2}.weight`` (gate, up, down; stacked).

Attention is full (as every nanovllm model's): a config with a ``sliding_window`` is served, with a warning,
exactly only for sequences no longer than that window.
"""
from nanovllm.logger import logger
from nanovllm.models.decoder import DecoderForCausalLM
from nanovllm.models.moe import MoeArgs, SparseMoe


class MixtralForCausalLM(DecoderForCausalLM):
    checkpoint_renames = {"block_sparse_moe": "mlp"}
    expert_weights = {"w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", None)}

    def __init__(self, hf_config: dict):
        window = hf_config.get("sliding_window")
        if window:
            logger.warning("Mixtral config sliding_window=%s: attention here is full, so sequences longer than "
                           "the window differ from the model's", window)
        super().__init__(hf_config)

    def make_mlp(self, hf_config: dict, layer_idx: int):
        moe = MoeArgs.from_hf(hf_config, experts_keys=("num_local_experts",), intermediate_key="intermediate_size",
                              renormalize=True)
        return SparseMoe(self.args.hidden_size, moe)
