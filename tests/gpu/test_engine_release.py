"""An engine's device memory comes back when it is dropped or closed, in graph mode too (CUDA graphs, compiled
steps): ``del llm`` alone (no garbage collection), ``llm.close()`` and leaving ``with LLM(...) as llm:``."""
import gc

import pytest
import torch

from conftest import build_checkpoint
from nanovllm import LLM, SamplingParams

OPTIONS = dict(device="cuda", kvcache_block_size=16, graph_batch_sizes=[8], max_num_seqs=8, max_model_len=512,
               gpu_memory_utilization=0.5)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


def allocated_gib() -> float:
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated() / 2**30


@pytest.mark.parametrize("release", ["del", "close", "with"])
def test_a_graph_mode_engine_gives_its_memory_back(checkpoint, release):
    gc.collect()
    torch.cuda.empty_cache()
    before = allocated_gib()
    gc.disable()  # a reference cycle would keep the engine alive until a collection: there must be none
    try:
        llm = LLM(checkpoint, **OPTIONS)
        assert llm.engine.describe()["mode"] == "graph"
        held = allocated_gib()
        if release == "with":
            with llm:
                llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        else:
            llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
        if release == "close":
            llm.close()
            with pytest.raises(RuntimeError):
                llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2), use_tqdm=False)
        del llm
        after = allocated_gib()
    finally:
        gc.enable()
    assert held - before > 10, (before, held)  # the KV cache alone is far above this
    assert after - before < 0.5, (before, held, after)


def test_the_next_engine_gets_the_memory_a_dropped_one_held(checkpoint):
    gc.collect()
    torch.cuda.empty_cache()
    llm = LLM(checkpoint, **OPTIONS)
    llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    first = llm.engine.describe()["num_kv_blocks"]
    del llm
    second = LLM(checkpoint, **OPTIONS)
    assert second.engine.describe()["num_kv_blocks"] >= 0.95 * first
