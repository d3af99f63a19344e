"""What the engine does differently for a hybrid model (linear-attention layers with per-sequence state pools,
``models/hybrid.py``): the features it refuses by name, because a recurrent state cannot be rolled back or rebuilt
from the paged cache."""


def refuse_for_hybrid(model_name: str, config) -> None:
    """A ValueError naming the model and the option, for the options a hybrid model does not support."""
    if config.speculative is not None:
        raise ValueError(f"speculative_config is not supported for {model_name}, a hybrid linear-attention model: "
                         f"a rejected draft token would need the recurrent state before it (see docs/MODELS.md)")
    if config.fp8_kv_cache:
        raise ValueError(f"kv_cache_dtype={config.kv_cache_dtype!r} is not supported for {model_name}, a hybrid "
                         f"linear-attention model; use kv_cache_dtype='auto'")
