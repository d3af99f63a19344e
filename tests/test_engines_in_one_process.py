"""Any sequence of engines in one process works in graph mode, with a cold or warm compile cache, and deleting an
``LLM`` releases its model and KV cache."""
import gc
import weakref

import pytest

from conftest import build_checkpoint
from nanovllm import LLM, SamplingParams

GREEDY = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
SMALL = dict(max_num_seqs=4, graph_batch_sizes=[2, 4], kvcache_block_size=16, num_kvcache_blocks=32, max_model_len=64)


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """Two Llama checkpoints whose only difference in code-relevant config is a float (rms_norm_eps)."""
    return (build_checkpoint(tmp_path_factory.mktemp("eps5"), "llama", rms_norm_eps=1e-5),
            build_checkpoint(tmp_path_factory.mktemp("eps6"), "llama", seed=1, rms_norm_eps=1e-6))


@pytest.mark.slow
def test_engines_with_different_float_configs_run_one_after_another(two_checkpoints, tmp_path, monkeypatch):
    """A (cold cache), B (cold), A again (warm: its entry is loaded) in one process, each equal to eager mode."""
    monkeypatch.setenv("NANOVLLM_CACHE_DIR", str(tmp_path))
    prompts = [[1, 2, 3], [4, 5]]
    expected = {}
    for path in two_checkpoints:
        eager = LLM(path, enforce_eager=True, **SMALL)
        expected[path] = eager.generate(prompts, GREEDY, use_tqdm=False)
        del eager
    for path, cache in zip(two_checkpoints + two_checkpoints[:1], ("miss", "miss", "hit")):
        llm = LLM(path, **SMALL)
        d = llm.engine.describe()
        assert (d["mode"], d["compile_cache"]) == ("graph", cache)
        assert llm.generate(prompts, GREEDY, use_tqdm=False) == expected[path]
        del llm
    assert expected[two_checkpoints[0]] != expected[two_checkpoints[1]]


def test_deleting_an_llm_releases_its_model_and_kv_cache(two_checkpoints):
    llm = LLM(two_checkpoints[0], **SMALL)
    llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
    model = weakref.ref(llm.engine.runner.model)
    kv = weakref.ref(llm.engine.runner.kv_caches[0][0])
    del llm
    gc.collect()
    assert model() is None and kv() is None
