"""``describe(runner)``: what a ``ModelRunner`` (``model_runner.py``) runs, for the start-up log line and benchmarks:
dtypes, KV cache (a window pool's and a hybrid model's state pools too), quantization, the bytes a step reads, the
quantized projections' dequantized copies, expert offload, start-up phases, executor and draft model."""
from nanovllm.engine import hybrid_state
from nanovllm.models.expert_offload import offload_stats
from nanovllm.models.moe import expert_footprint
from nanovllm.quant import dequantized


def describe(runner) -> dict:
    model = runner.model
    return {"device_type": runner.device.type, "dtype": str(runner.dtype).replace("torch.", ""),
            "kv_cache_dtype": str(runner.kv_spec.dtype).replace("torch.", ""), "kv_scales": runner.kv_scales,
            "num_kv_blocks": runner.num_blocks, "kvcache_block_size": runner.block_size,
            "kv_bytes_per_token": runner.kv_spec.bytes_per_token, **_window_pool(runner), **_state_pools(runner),
            "quantization": _quantization(runner.config, model),
            "weight_bytes": sum(t.numel() * t.element_size() for t in model.parameters()) + sum(
                t.numel() * t.element_size() for name, t in model.named_buffers()
                if name.endswith(("_scale", "_zero"))),  # quantized weights' scales and zeros are read too
            **dict(zip(("expert_bytes", "expert_share"), expert_footprint(model))),
            **({"dequantized_copy_bytes": copies} if (copies := dequantized.copy_bytes(model)) else {}),
            **({"expert_offload": offload_stats(model)} if runner.expert_caches else {}),
            "init_phases": dict(runner.init_phases), **runner.executor.describe(),
            **({"draft": runner.drafter.describe()} if runner.drafter is not None else {})}


def _quantization(config, model) -> str | None:
    """The start-up line's quantization: the checkpoint's scheme's, else the online one's."""
    scheme = config.quant_scheme or config.online_scheme
    return scheme.describe(model) if scheme is not None else None


def _window_pool(runner) -> dict:
    """A window pool's (``kv_cache.KVCacheSpec.plan_window_pool``) W, blocks and bytes per token; none without."""
    spec = runner.kv_spec
    if not spec.window:
        return {}
    return {"kv_window": spec.window, "num_window_blocks": spec.num_window_blocks(runner.num_blocks) - 1,
            "window_kv_bytes_per_token": spec.bytes_per_window_block // spec.block_size}


def _state_pools(runner) -> dict:
    """A hybrid model's state slots: running sequences' (with their verify steps' spares) and scratch, prefix-cache
    snapshots, their bytes; none without."""
    if not runner.hybrid:
        return {}
    spec, running = runner.kv_spec, hybrid_state.snapshots_start(runner.config)
    return {"state_slots": running, "state_snapshots": spec.num_state_slots - running, "state_bytes": spec.state_bytes}
