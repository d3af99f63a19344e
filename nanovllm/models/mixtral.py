"""Mixtral (8x7B, 8x22B): the Llama-style decoder (no biases, no q/k norm) with a mixture of experts in every
layer: ``num_local_experts`` experts of ``intermediate_size``, ``num_experts_per_tok`` per token.  Mixtral takes
the top-k router logits, then a softmax over those: the same weights as a softmax over all experts renormalised
over the top k, which is what ``ops.fused_moe`` computes with ``renormalize``.

Checkpoint names: ``block_sparse_moe`` is our ``mlp``; ``block_sparse_moe.gate.weight`` (router) and
``block_sparse_moe.experts.<e>.{w1,w3,w2}.weight`` (gate, up, down; stacked).

Attention is Mistral's (``mistral.py``): a config's ``sliding_window`` W (null in the published Mixtral configs)
gives every layer a window of W keys, the query's own included, as transformers' Mixtral.
"""
from nanovllm.models.mistral import MistralForCausalLM
from nanovllm.models.moe import MoeArgs, SparseMoe


class MixtralForCausalLM(MistralForCausalLM):
    checkpoint_renames = {"block_sparse_moe": "mlp"}
    expert_weights = {"w1": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1), "w2": ("down_proj", None)}

    def make_mlp(self, hf_config: dict, layer_idx: int):
        moe = MoeArgs.from_hf(hf_config, experts_keys=("num_local_experts",), intermediate_key="intermediate_size",
                              renormalize=True)
        return SparseMoe(self.args.hidden_size, moe)
