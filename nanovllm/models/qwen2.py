"""Qwen2 and Qwen2.5: the shared decoder with a bias on q, k and v (none on o), no q/k norm.

Sliding windows as transformers' ``Qwen2Config``: only with ``use_sliding_window`` (off in the published configs),
a window of ``sliding_window`` keys (the query's own included, ``mistral.py``'s convention) on the layers that
``layer_types`` marks ``sliding_attention``, or where a config has no ``layer_types``, on layers
``max_window_layers`` and later.
"""
from nanovllm.models.decoder import DecoderForCausalLM


def qwen2_windows(hf_config: dict) -> list[int]:
    """Each layer's sliding window (0: full attention) from a Qwen2 config."""
    n = hf_config["num_hidden_layers"]
    window = int(hf_config.get("sliding_window") or 0) if hf_config.get("use_sliding_window") else 0
    if not window:
        return [0] * n
    kinds = hf_config.get("layer_types")
    if kinds is None:
        first = hf_config.get("max_window_layers", 28)  # transformers' default
        kinds = ["sliding_attention" if i >= first else "full_attention" for i in range(n)]
    unknown = sorted(set(kinds) - {"sliding_attention", "full_attention"})
    if unknown or len(kinds) != n:
        raise ValueError(f"Qwen2 layer_types {kinds!r}: expected {n} of sliding_attention, full_attention")
    return [window if kind == "sliding_attention" else 0 for kind in kinds]


class Qwen2ForCausalLM(DecoderForCausalLM):
    qkv_bias = True

    def attention_options(self, hf_config: dict, layer_idx: int) -> dict:
        """Layer ``layer_idx``'s sliding window where the config turns windows on (``qwen2_windows``)."""
        window = qwen2_windows(hf_config)[layer_idx]
        return {"window": window} if window else {}
