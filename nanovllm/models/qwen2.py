"""Qwen2 and Qwen2.5: the shared decoder with a bias on q, k and v (none on o), no q/k norm."""
from nanovllm.models.decoder import DecoderForCausalLM


class Qwen2ForCausalLM(DecoderForCausalLM):
    qkv_bias = True
