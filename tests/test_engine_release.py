"""An engine gives its device memory back: dropping the last reference frees it without the garbage collector (no
reference cycle holds a graph-mode engine), ``Engine.close()`` frees it while references remain, and sizing a KV
cache collects garbage before it gives up and names the other live engines that hold memory."""
import gc
import weakref

import pytest
import torch

from conftest import build_checkpoint
from nanovllm import SamplingParams
from nanovllm.config import EngineConfig
from nanovllm.engine import kv_cache
from nanovllm.engine.engine import Engine

SMALL = dict(max_num_seqs=4, graph_batch_sizes=[2, 4], kvcache_block_size=16, num_kvcache_blocks=32, max_model_len=64)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("release"), "qwen3")


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    """One compile cache for the module's graph-mode engines: the first traces and saves, the next load."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOVLLM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        yield


def _run(engine: Engine) -> None:
    """A plain and a logprobs request to the end (the logprobs variant's graph is built too)."""
    engine.add_request([1, 2, 3], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    engine.add_request([4, 5], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2))
    while engine.has_work():
        engine.step()


def _held(engine: Engine) -> dict:
    runner = engine.runner
    return {"engine": weakref.ref(engine), "model": weakref.ref(runner.model),
            "kv": weakref.ref(runner.kv_caches[0][0]), "token_buffer": weakref.ref(runner.token_buffer),
            "executor": weakref.ref(runner.executor)}


def test_a_dropped_graph_mode_engine_is_freed_without_the_garbage_collector(path):
    gc.collect()
    gc.disable()
    try:
        engine = Engine(EngineConfig(path, **SMALL))
        assert engine.runner.mode == "graph"
        _run(engine)
        assert engine.runner.executor.variant_graph_sizes("logprobs") == [2]
        held = _held(engine)
        del engine
        assert {name: ref() is None for name, ref in held.items()} == dict.fromkeys(held, True)
    finally:
        gc.enable()


def test_close_releases_the_model_kv_cache_and_graphs_while_the_engine_is_referenced(path):
    engine = Engine(EngineConfig(path, **SMALL))
    _run(engine)
    held = _held(engine)
    executor = engine.runner.executor
    engine.close()
    engine.close()  # idempotent
    gc.collect()
    assert held["engine"]() is engine and held["executor"]() is executor  # still referenced here
    assert held["model"]() is None and held["kv"]() is None and held["token_buffer"]() is None
    assert executor.graphs == {} and executor.compiled is None and executor.variant_graphs["logprobs"].graphs == {}
    assert engine.runner.device_bytes() == 0
    engine.add_request([1, 2], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match=r"this engine was closed \(Engine.close\(\)\)"):
        engine.step()


class _ShortMemory:
    """A platform that measures memory and finds room for ``blocks()`` KV blocks of ``per_block`` bytes."""
    measures_memory = True
    device = torch.device("cpu")

    def __init__(self, per_block: int, blocks):
        self.per_block, self.blocks = per_block, blocks

    def reset_peak_memory(self):
        pass

    def synchronize(self):
        pass

    def available_kv_bytes(self, utilization):
        return self.blocks() * self.per_block


def _plan(platform, spec) -> int:
    return kv_cache.plan_num_blocks(spec, fixed=None, utilization=0.9, platform=platform, max_blocks_per_seq=4,
                                    max_model_len=64, probe=lambda: [])


def test_short_memory_error_names_the_other_engines_and_what_they_hold(path):
    spec = kv_cache.KVCacheSpec(2, 2, 32, 16, torch.float32)
    gc.collect()
    assert kv_cache.held_by_engines(torch.device("cpu")) == (0, 0)  # the earlier tests' engines are gone
    engine = Engine(EngineConfig(path, enforce_eager=True, **SMALL))
    nothing = _ShortMemory(spec.bytes_per_block, lambda: 0)
    held = engine.runner.device_bytes()
    assert held > engine.runner.kv_spec.bytes_per_block * 32  # weights and the KV cache
    with pytest.raises(ValueError, match=rf"holds 0 blocks .* needs 4: 1 other engine\(s\) of this process still "
                                         rf"hold {held / 2**30:.2f} GiB on cpu; close them \(LLM.close\(\)\)"):
        _plan(nothing, spec)
    engine.close()  # a closed engine holds nothing and is not counted
    with pytest.raises(ValueError, match=r"holds 0 blocks .* needs 4; lower max_model_len, raise "
                                         r"num_kvcache_blocks or gpu_memory_utilization"):
        _plan(nothing, spec)


def test_an_engine_dropped_in_a_reference_cycle_is_collected_before_the_cache_is_sized(path):
    spec = kv_cache.KVCacheSpec(2, 2, 32, 16, torch.float32)
    gc.collect()
    gc.disable()
    try:
        cycle = [Engine(EngineConfig(path, enforce_eager=True, **SMALL))]
        cycle.append(cycle)
        dropped = weakref.ref(cycle[0])
        del cycle
        assert dropped() is not None  # only the collector can free it
        room = _ShortMemory(spec.bytes_per_block, lambda: 0 if dropped() is not None else 10)
        assert _plan(room, spec) == 10 and dropped() is None
    finally:
        gc.enable()
