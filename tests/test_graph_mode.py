"""Graph mode: whole-step graphs with no breaks, no recompiles after start-up, tokens identical to eager."""
import contextlib
import random

import pytest
import torch

from conftest import build_checkpoint
from nanovllm import LLM, SamplingParams
from nanovllm.compile.buckets import pick_bucket, split_batch
from nanovllm.engine.sequence import Sequence
from nanovllm.step import make_step

BUCKETS = [1, 2, 4]


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("graph"), "qwen3")


@pytest.fixture(scope="module")
def graph_llm(path):
    return LLM(path, graph_batch_sizes=BUCKETS, max_num_seqs=7, kvcache_block_size=16, num_kvcache_blocks=96,
               max_model_len=128)


@pytest.fixture(scope="module")
def eager_llm(path):
    return LLM(path, enforce_eager=True, max_num_seqs=7, kvcache_block_size=16, num_kvcache_blocks=96,
               max_model_len=128)


@pytest.fixture(scope="module")
def padded_prefill_llms(path):
    """Graph mode with prefill steps padded to 16 or 48 tokens (uncaptured on the CPU, the same padding as the
    captured prefill graphs of CUDA), and eager mode with the same step budget (so the same chunking)."""
    common = dict(max_num_seqs=7, kvcache_block_size=16, num_kvcache_blocks=96, max_model_len=128,
                  max_num_batched_tokens=48)
    return (LLM(path, graph_batch_sizes=BUCKETS, prefill_graph_sizes=[48, 16, 16], **common),
            LLM(path, enforce_eager=True, **common))


def test_bucket_policy():
    assert [pick_bucket(n, (1, 2, 4, 8)) for n in (1, 2, 3, 4, 5, 8)] == [1, 2, 4, 4, 8, 8]
    assert split_batch(11, (1, 2, 4)) == [(0, 4), (4, 4), (8, 3)]
    with pytest.raises(ValueError, match="exceeds the largest bucket 8"):
        pick_bucket(9, (1, 2, 4, 8))


def test_default_buckets_are_capped_at_max_num_seqs(path):
    from nanovllm.config import EngineConfig
    assert EngineConfig(path, max_num_seqs=40).graph_batch_sizes == (1, 2, 4, 8, 16, 32, 40)
    assert EngineConfig(path, graph_batch_sizes=[8, 2, 8, 4]).graph_batch_sizes == (2, 4, 8)


def _decode_and_prefill_inputs(llm):
    runner = llm.engine.runner
    seq = Sequence(0, [5, 6, 7], SamplingParams(), seed=0)
    seq.block_table = [0]
    return runner.decode_builder.build([seq], 4), runner.prefill_builder.dummy()


def test_decode_and_prefill_steps_trace_with_zero_graph_breaks(eager_llm):
    runner = eager_llm.engine.runner
    decode_inputs, prefill_inputs = _decode_and_prefill_inputs(eager_llm)
    for inputs in (decode_inputs, prefill_inputs):
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(make_step(runner.model, runner.kv_caches, runner.token_buffer))(inputs)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


def test_every_batch_size_matches_eager_without_recompiling(graph_llm, eager_llm):
    from torch._dynamo.utils import counters
    assert graph_llm.engine.runner.mode == "graph"
    rng = random.Random(0)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    compiles_before = counters["stats"]["unique_graphs"]
    for n in range(1, BUCKETS[-1] + 4):  # 1..7: every bucket, sizes between them, and splits past the largest
        prompts = [[rng.randint(3, 383) for _ in range(rng.randint(1, 30))] for _ in range(n)]
        with torch.compiler.set_stance("fail_on_recompile"):
            graph = graph_llm.generate(prompts, params, use_tqdm=False)
        eager = eager_llm.generate(prompts, params, use_tqdm=False)
        assert [o["token_ids"] for o in graph] == [o["token_ids"] for o in eager], f"batch of {n}"
    assert counters["stats"]["unique_graphs"] == compiles_before


def test_seeded_sampling_in_graph_mode_matches_eager(graph_llm, eager_llm):
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    params = [SamplingParams(temperature=0.8, max_tokens=8, ignore_eos=True, seed=s) for s in (11, 12)]
    assert graph_llm.generate(prompts, params, use_tqdm=False) == eager_llm.generate(prompts, params, use_tqdm=False)


def test_padded_rows_never_write_into_live_kv(graph_llm):
    runner = graph_llm.engine.runner
    seq = Sequence(0, [5, 6, 7], SamplingParams(), seed=0)
    seq.block_table = [3]
    inputs = runner.decode_builder.build([seq], 4)  # one live row, three padded rows
    stacked = lambda: torch.stack([torch.stack(kv) for kv in runner.kv_caches])  # [layer, k/v, block, head, off, d]
    before = stacked()
    runner.executor.run_decode(inputs, 4)
    changed = (stacked() != before).nonzero()
    # only layer k/v of block 3, offset 2 (position 2 of the live sequence) may change
    assert changed.numel() > 0
    assert set(changed[:, 2].tolist()) == {3} and set(changed[:, 4].tolist()) == {2}


@contextlib.contextmanager
def _scheduled_prefill(engine, first_id: int):
    """A scheduled prefill of two prompts (tokens 1..5 and 1..9), holding the token slots the scheduler gave them;
    yields (batch, seqs) and aborts both afterwards (freeing blocks and slots), so the engine can be used again."""
    seqs = [Sequence(first_id + i, list(range(1, n + 1)), SamplingParams(max_tokens=2), seed=i)
            for i, n in enumerate((5, 9))]
    for seq in seqs:
        engine.scheduler.add(seq)
    batch = engine.scheduler.schedule()
    try:
        assert batch.is_prefill and batch.seqs == seqs
        assert None not in (s.token_slot for s in seqs)
        yield batch, seqs
    finally:
        for seq in seqs:
            engine.scheduler.abort(seq)


def test_prefill_step_data_is_one_packed_buffer(eager_llm):
    """A real prefill's inputs are views of one buffer (on CUDA: pinned, moved in one asynchronous copy)."""
    with _scheduled_prefill(eager_llm.engine, first_id=100) as (batch, _):
        inputs = eager_llm.engine.runner.prefill_builder.build(batch)
        storage = inputs.buffer.untyped_storage().data_ptr()
        for name in ("input_ids", "positions", "slot_mapping", "block_tables", "context_lens", "cu_seqlens_q"):
            assert getattr(inputs, name).untyped_storage().data_ptr() == storage, name
        assert inputs.input_ids.tolist() == list(range(1, 6)) + list(range(1, 10)) + [0]  # + the padding token
        assert inputs.cu_seqlens_q.tolist() == [0, 5, 14, 15] and inputs.context_lens.tolist() == [5, 9, 0]


def test_dummy_prefills_are_valid_prompts_inside_the_model_length(eager_llm):
    """Start-up runs all-padding prefills as large as a step can be.  Each dummy sequence must be a valid prompt:
    context = its tokens and positions from 0 (the attention kernel reads KV blocks below position 0 otherwise, an
    illegal address on CUDA), all inside max_model_len (the rope tables)."""
    runner = eager_llm.engine.runner
    limit = eager_llm.config.max_model_len
    inputs = runner.prefill_builder.dummy(tokens=4 * limit + 1, rows=5)
    cu = inputs.cu_seqlens_q.tolist()
    assert cu[0] == 0 and cu[-1] == 4 * limit + 1 and len(cu) == 6
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    assert inputs.context_lens.tolist() == lengths and max(lengths) == limit
    positions = inputs.positions.tolist()
    for start, n in zip(cu, lengths):
        assert positions[start:start + n] == list(range(n))
    assert set(inputs.slot_mapping.tolist()) == {-1}
    with pytest.raises(AssertionError, match="longer than max_model_len"):
        runner.prefill_builder.dummy(tokens=4 * limit + 3, rows=3)


def test_default_prefill_graph_sizes_and_bad_ones(path):
    from nanovllm.compile.prefill_graphs import default_prefill_sizes
    from nanovllm.config import EngineConfig
    assert default_prefill_sizes(256, 16384) == (384, 512, 768, 1024, 1536, 2048, 3072, 4096, 8192, 12288, 16384)
    assert default_prefill_sizes(600, 16384) == (768, 1024, 1536, 2048, 3072, 4096, 8192, 12288, 16384)
    assert default_prefill_sizes(64, 16384)[:4] == (128, 192, 256, 384)  # a step pads to at most 1.5 times its tokens
    assert default_prefill_sizes(256, 1000) == (448, 704, 1000)  # sizes up to max_num_seqs + 1 are dropped
    assert EngineConfig(path, max_num_seqs=8, max_model_len=512).max_step_tokens == 4096
    assert EngineConfig(path, prefill_graph_sizes=[]).prefill_graph_sizes == ()
    for bad in ([8], [20000], ["64"]):
        with pytest.raises(ValueError, match="must be ints in"):
            EngineConfig(path, max_num_seqs=7, prefill_graph_sizes=bad)
    with pytest.raises(TypeError, match="list of token counts"):
        EngineConfig(path, prefill_graph_sizes=64)


def test_prefill_padded_to_a_graph_size_gets_one_padding_sequence_then_empty_rows(padded_prefill_llms):
    llm = padded_prefill_llms[0]
    engine, runner = llm.engine, llm.engine.runner
    assert runner.executor.prefill_graphs.sizes == (16, 48) and runner.executor.captures_every_prefill()
    assert runner.executor.prefill_shape(14) == ((16, 8), None)  # nothing captured on the CPU: no static inputs
    assert runner.executor.prefill_shape(17)[0] == (48, 8)
    with _scheduled_prefill(engine, first_id=200) as (batch, seqs):
        inputs = runner.prefill_builder.build(batch, (16, 8))
        assert inputs.input_ids.tolist() == list(range(1, 6)) + list(range(1, 10)) + [0, 0]
        assert inputs.cu_seqlens_q.tolist() == [0, 5, 14] + [16] * 6
        assert inputs.context_lens.tolist() == [5, 9] + [0] * 6
        assert inputs.slot_mapping.tolist()[14:] == [-1, -1] and min(inputs.slot_mapping.tolist()[:14]) >= 0
        assert inputs.logits_indices.tolist() == [4, 13] + [15] * 6
        assert inputs.out_slots.tolist() == [s.token_slot for s in seqs] + [runner.scratch_slot] * 6
        with pytest.raises(AssertionError, match="padded shape"):
            runner.prefill_builder.build(batch, (13, 8))


def test_padded_prefill_steps_match_eager(padded_prefill_llms):
    """Prompts of 1-100 tokens under a 48-token step budget: chunked prefills of every size, padded to 16 or 48
    tokens, must give eager mode's tokens, greedy, seeded and with top-k/top-p."""
    graph, eager = padded_prefill_llms
    rng = random.Random(1)
    prompts = [[rng.randint(3, 383) for _ in range(n)] for n in (1, 7, 15, 16, 17, 40, 100)]
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    seeded = [SamplingParams(temperature=0.8, max_tokens=5, ignore_eos=True, seed=s) for s in range(len(prompts))]
    filtered = [SamplingParams(temperature=0.8, top_k=5, top_p=0.9, max_tokens=5, ignore_eos=True, seed=s)
                for s in range(len(prompts))]  # re-drawn outside the graph from its logits
    for params in (greedy, seeded, filtered):
        with torch.compiler.set_stance("fail_on_recompile"):
            got = graph.generate(prompts, params, use_tqdm=False)
        assert got == eager.generate(prompts, params, use_tqdm=False)
