"""Mistral (7B, Nemo, ...): the Llama-style decoder (``decoder.py``) with, where the config sets ``sliding_window``
W, a sliding window of W keys on every layer (``ops.paged_attention``'s ``window``; the engine keeps the layers' KV
in a window pool of its own, ``engine/window_blocks.py``).  ``sliding_window`` null (Mistral 7B v0.2 and later):
full attention, as Llama.

The window is transformers' (``masking_utils.sliding_window_overlay``, which Mistral and Mixtral use): the query at
position p sees keys j with p - W < j <= p, W keys with its own.  That is ``ops.paged_attention``'s convention too
(``kernels/reference.py``), so W passes through unchanged, with no off-by-one to map.
"""
from nanovllm.models.decoder import DecoderForCausalLM


def config_window(hf_config: dict) -> int:
    """The config's ``sliding_window`` (0: none)."""
    return int(hf_config.get("sliding_window") or 0)


class MistralForCausalLM(DecoderForCausalLM):
    def attention_options(self, hf_config: dict, layer_idx: int) -> dict:
        """Every layer: the config's sliding window where it sets one, else full attention."""
        window = config_window(hf_config)
        return {"window": window} if window else {}
