"""``make_executor``: the executor a model runs under, chosen from the engine's options, the model and the platform."""
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
