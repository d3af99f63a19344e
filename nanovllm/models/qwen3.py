"""Qwen3 (dense): the shared decoder with RMSNorm on each head's q and k, no qkv bias."""
from nanovllm.models.decoder import DecoderForCausalLM


class Qwen3ForCausalLM(DecoderForCausalLM):
    qk_norm = True
