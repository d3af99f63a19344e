"""Sliding windows in the Llama-style family (``models/mistral.py``, ``mixtral.py``, ``qwen2.py``): a config's
``sliding_window`` gives Mistral and Mixtral a window on every layer, Qwen2's ``use_sliding_window`` on the layers
from ``max_window_layers`` (transformers' rules).  Greedy float32 tokens identical to transformers in eager and graph
mode, with a 12-token window that ends mid-block (16-token blocks), prompts and generations longer than the window
and than a prefill chunk, and sequences that start and finish at different steps.
"""
import pytest
import torch

from conftest import STAGGERED_ENGINE as ENGINE, build_checkpoint
from family_checks import check_staggered_batch
from nanovllm import LLM
from nanovllm.models.mistral import config_window
from nanovllm.models.qwen2 import qwen2_windows

W = 12
CASES = {  # arch: (config overrides, each layer's window)
    "mistral": (dict(sliding_window=W), [W, W]),
    "mixtral": (dict(sliding_window=W), [W, W]),
    "qwen2": (dict(use_sliding_window=True, sliding_window=W, max_window_layers=1), [0, W]),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def engines(request, tmp_path_factory):
    arch = request.param
    overrides, windows = CASES[arch]
    path = build_checkpoint(tmp_path_factory.mktemp(arch), arch, **overrides)
    eager = LLM(path, enforce_eager=True, **ENGINE)
    graph = LLM(path, graph_batch_sizes=[1, 2, 4], **ENGINE)
    yield path, windows, eager, graph
    for llm in (eager, graph):
        llm.close()


def test_layers_take_the_config_window_and_its_pool(engines):
    _, windows, eager, graph = engines
    for llm in (eager, graph):
        assert llm.engine.runner.model.layer_windows() == windows
    assert graph.engine.runner.mode == "graph"
    assert graph.engine.block_manager.window.window == W  # the sliding layers' KV in a window pool of its own


def test_staggered_batch_past_the_window_matches_transformers_in_both_modes(engines):
    path, _, eager, graph = engines
    lengths = [20, 5, 14, 24, 3]  # generations longer than the window; rows finish at different steps
    check_staggered_batch(path, eager, graph, lengths)


def test_configs_without_a_window_keep_full_attention():
    assert config_window({"sliding_window": None}) == config_window({}) == 0
    assert config_window({"sliding_window": 4096}) == 4096
    # Qwen2: a sliding_window alone (as the published configs give one) turns nothing on
    assert qwen2_windows({"num_hidden_layers": 3, "sliding_window": 8, "max_window_layers": 1}) == [0, 0, 0]
    assert qwen2_windows({"num_hidden_layers": 3, "use_sliding_window": True, "sliding_window": 8,
                          "max_window_layers": 1}) == [0, 8, 8]
    assert qwen2_windows({"num_hidden_layers": 2, "use_sliding_window": True, "sliding_window": 8,
                          "layer_types": ["sliding_attention", "full_attention"]}) == [8, 0]
    with pytest.raises(ValueError, match="layer_types"):
        qwen2_windows({"num_hidden_layers": 2, "use_sliding_window": True, "sliding_window": 8,
                       "layer_types": ["sliding_attention", "chunked_attention"]})


def test_a_cache_of_windowed_layers_only_sizes_its_full_blocks():
    """Every layer windowed (Mistral): a full block holds no KV, so past the window pool a budget gives a fixed count
    (every sequence at max_model_len, twice) instead of dividing by a zero block size."""
    from types import SimpleNamespace

    from nanovllm.engine.kv_cache import KVCacheSpec
    spec = KVCacheSpec(2, 2, 16, 16, torch.float32, windows=[W, W])
    spec.plan_window_pool(SimpleNamespace(max_model_len=160, max_num_seqs=4, max_step_tokens=48))
    assert spec.window == W and spec.bytes_per_block == 0
    assert spec.blocks_within(2**30) == 2 * 4 * 10
    assert spec.blocks_within(spec.bytes_per_window_block * (spec.window_kept + 3)) == 2  # the pool still grows
