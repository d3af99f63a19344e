"""Llama 2/3.x (incl. SmolLM2): the shared decoder; biases follow ``attention_bias``/``mlp_bias``,
rope scaling ``llama3`` and tied embeddings come from the config."""
from nanovllm.models.decoder import DecoderForCausalLM


class LlamaForCausalLM(DecoderForCausalLM):
    pass
