"""``make_executor``: the executor a model runs under, chosen from the engine's options, the model and the platform;
``round_like_eager``: the Inductor setting a model may ask for so that its graph mode rounds as eager mode does."""
from nanovllm import envs
from nanovllm.compile.base import Executor, ExecutorSpec
from nanovllm.compile.eager import EagerExecutor
from nanovllm.compile.graph import GraphExecutor
from nanovllm.compile.static_graph import StaticGraphExecutor
from nanovllm.logger import logger


def make_executor(spec: ExecutorSpec, *, enforce_eager: bool, capturable: bool,
                  not_capturable_reason: str = "") -> Executor:
    """Graph mode unless eager is forced, the model cannot be captured (logged) or the platform runs eagerly by
    default (MPS); one static graph per bucket where the platform needs static shapes."""
    platform = spec.platform
    if enforce_eager:
        return EagerExecutor(spec)
    if not capturable:
        logger.warning("the model runs eagerly: %s", not_capturable_reason)
        return EagerExecutor(spec)
    if not platform.compiles_by_default:
        logger.info("the %s platform runs eagerly by default (nanovllm/platforms/%s.py says why and how to compile)",
                    platform.name, platform.name)
        return EagerExecutor(spec)
    if platform.static_shapes:
        return StaticGraphExecutor(spec)
    return GraphExecutor(spec)


def round_like_eager(model) -> None:
    """For a model that declares ``emulate_precision_casts`` (Gemma 4, whose bf16 graph mode otherwise left
    transformers' tokens beyond near ties): Inductor rounds each intermediate its fused kernels keep in float32
    where eager mode rounds it to the model's dtype.  Process-wide: once on it stays on (the start-up line lists
    it; compile-cache keys record it)."""
    from torch._inductor import config
    if getattr(model, "emulate_precision_casts", False) and not config.emulate_precision_casts:
        config.emulate_precision_casts = True
        envs.note_process_setting("torch._inductor.config.emulate_precision_casts", True)
