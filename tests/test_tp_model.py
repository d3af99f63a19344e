"""Tensor-parallel models on two CPU ranks over gloo, before the engine starts workers itself: each rank builds
the same engine (the model reads its rank from ``distributed.current()``), runs the same deterministic generate,
and its all-reduces and logit gathers meet the other rank's.  Greedy float32 tokens must equal transformers'.  A
dense model at two ranks in graph mode: ``test_tp_scheduling.py`` (its tokens equal one rank's, which equal
transformers'); here the MoE one."""

import pytest
import torch.multiprocessing as mp

from conftest import build_checkpoint, free_port, hf_greedy
from nanovllm import distributed

pytestmark = pytest.mark.slow

ENGINE = dict(max_num_seqs=4, kvcache_block_size=16, num_kvcache_blocks=32, max_model_len=128)
PROMPTS = [[5, 9, 13, 2, 7], [11, 3], [4, 4, 8, 15, 16, 23, 42, 1, 2]]


def _rank(rank, size, port, path, eager, results):
    from nanovllm import LLM, SamplingParams
    distributed.init_process_group("gloo", rank, size, init_method=f"tcp://127.0.0.1:{port}")
    llm = LLM(path, enforce_eager=eager, graph_batch_sizes=[1, 2, 4], **ENGINE)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    results[rank] = [o["token_ids"] for o in llm.generate(PROMPTS, params, use_tqdm=False)]


def _run(path, size, eager):
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_rank, args=(size, free_port(), path, eager, results), nprocs=size, join=True)
        return [results[r] for r in range(size)]


@pytest.mark.parametrize("arch,overrides,eager", [
    ("qwen3", {}, True), ("llama", {"num_key_value_heads": 1}, True), ("llama3", {"vocab_size": 383}, True),
    ("qwen3_moe", {}, True), ("qwen3_moe", {}, False)],
    ids=["qwen3-eager", "llama-kv-replicated", "llama3-tied-odd-vocab", "qwen3_moe-eager", "qwen3_moe-graph"])
def test_two_ranks_give_transformers_tokens(tmp_path, arch, overrides, eager):
    path = build_checkpoint(tmp_path, arch, **overrides)
    want = hf_greedy(path, PROMPTS, 6)
    for tokens in _run(path, 2, eager):
        assert tokens == want


def test_heads_that_do_not_split_are_refused_by_name(tmp_path):
    from nanovllm.models.tensor_parallel import split
    previous = distributed.set_current(distributed.TensorParallel(0, 3))
    try:
        with pytest.raises(ValueError, match="tensor_parallel_size=3 does not divide num_attention_heads=4"):
            split(4, "num_attention_heads")
    finally:
        distributed.set_current(previous)


@pytest.mark.parametrize("arch,eager", [("qwen3_next", True), ("qwen3_5", True)], ids=["qwen3_next", "qwen3_5"])
def test_hybrid_models_at_two_ranks_give_transformers_tokens(tmp_path, arch, eager):
    """Gated DeltaNet heads split over two ranks (Qwen3-Next's interleaved projections, Qwen3.5's separate ones, the
    convolution's three pieces), the full-attention layers as the decoder's; eager (graph mode adds nothing TP-specific
    for these layers: the single-rank graph tests and the TP graph tests of the dense models cover it)."""
    path = build_checkpoint(tmp_path, arch)
    want = hf_greedy(path, PROMPTS, 6)
    for tokens in _run(path, 2, eager):
        assert tokens == want
