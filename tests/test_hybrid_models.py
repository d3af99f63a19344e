"""Hybrid linear-attention models (Qwen3-Next, Qwen3.5, Qwen3.5-MoE; ``models/hybrid.py``): greedy float32 tokens
identical to transformers in eager and graph mode, on prompts longer than a prefill chunk and than several KV
blocks, in batches whose sequences start and finish at different steps (so each row's state slot carries across
chunks, mixed prefill and decode steps); graph mode compiles once (a published multimodal Qwen3.5 checkpoint, its
tower included: ``tests/test_vision_language.py``); an FP8 KV cache in the full-attention layers matches its oracle;
speculative decoding keeps the tokens, and a hybrid draft model is refused by name.
"""
import pytest
import torch

from conftest import STAGGERED_ENGINE as ENGINE, STAGGERED_PROMPTS as PROMPTS, build_checkpoint, hf_greedy
from conftest import greedy_tokens as tokens
from family_checks import check_staggered_batch
from nanovllm import LLM, SamplingParams


# Qwen3-Next (interleaved projections, MoE) in the quick tests; the other two families' runs are slow ones
@pytest.fixture(scope="module", params=["qwen3_next", pytest.param("qwen3_5", marks=pytest.mark.slow),
                                        pytest.param("qwen3_5_moe", marks=pytest.mark.slow)])
def engines(request, tmp_path_factory):
    """(checkpoint dir, eager LLM, graph LLM) of one family."""
    path = build_checkpoint(tmp_path_factory.mktemp(request.param), request.param)
    return path, LLM(path, enforce_eager=True, **ENGINE), LLM(path, graph_batch_sizes=[1, 2, 4], **ENGINE)


def test_layers_follow_the_config_and_graph_mode_is_used(engines):
    _, eager, graph = engines
    assert (eager.engine.runner.mode, graph.engine.runner.mode) == ("eager", "graph")
    kinds = [layer.kind for layer in graph.engine.runner.model.model.layers]
    assert kinds == graph.config.hf_config["layer_types"]
    caches = graph.engine.runner.kv_caches
    ssm = [c[1] for c, kind in zip(caches, kinds) if kind == "linear_attention"]
    slots = ENGINE["max_num_seqs"] + 1 + ENGINE["max_num_seqs"] // 4 + 2  # running rows, scratch, snapshots
    assert ssm and all(s.dtype == torch.float32 and s.shape[0] == slots for s in ssm)


def test_staggered_batch_matches_transformers_in_both_modes(engines):
    path, eager, graph = engines
    lengths = [12, 5, 9, 16, 3]  # rows finish at different steps; the 5 prompts outnumber max_num_seqs
    check_staggered_batch(path, eager, graph, lengths)


def test_a_rerun_starts_from_fresh_states(engines):
    """Slots are reused by later sequences: a second run of the same prompts gives the same tokens."""
    _, eager, _ = engines
    first = tokens(eager, PROMPTS[:3], [6, 6, 6])
    assert tokens(eager, PROMPTS[2:3] + PROMPTS[:2], [6, 6, 6]) == first[2:3] + first[:2]


def test_speculative_decoding_gives_the_plain_tokens(tmp_path):
    """An always-right proposer in graph mode (every proposed token kept: the state after the last one is copied into
    the token slot; verify steps of up to 16 rows run in parts of 4, which cut chains) gives the tokens of a run
    without speculation."""
    from test_speculative import PROMPTS, Oracle, generate
    path = build_checkpoint(tmp_path, "qwen3_next")
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    plain, _ = generate(path, params, speculative=None, eager=False)
    right, stats = generate(path, params, Oracle(dict(zip(map(tuple, PROMPTS), plain)), wrong=False), eager=False)
    assert right == plain and stats["spec_accepted_tokens"] == stats["spec_proposed_tokens"] > 0


@pytest.mark.slow
def test_rejected_proposals_give_the_plain_tokens(tmp_path):
    """Qwen3.5, eager, a proposer right on its first token and wrong after it: every verify step keeps one proposed
    token of three, so each sequence takes the state of a row inside its chain, and the tokens are those of a run
    without speculation."""
    from test_speculative import PROMPTS, Oracle, generate

    class FirstRight(Oracle):
        def propose(self, tokens, limit):
            right = super().propose(tokens, limit)
            return right[:1] + [(t + 1) % 300 for t in right[1:]]

    path = build_checkpoint(tmp_path, "qwen3_5")
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    plain, _ = generate(path, params, speculative=None)
    got, stats = generate(path, params, FirstRight(dict(zip(map(tuple, PROMPTS), plain)), wrong=False))
    assert got == plain
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_proposed_tokens"]
    assert stats["spec_accepted_by_position"][1:] == [0, 0]


def test_a_hybrid_draft_model_is_refused_by_name(tmp_path):
    target, draft = build_checkpoint(tmp_path / "target", "qwen3"), build_checkpoint(tmp_path / "draft", "qwen3_next")
    with pytest.raises(ValueError, match="is a hybrid linear-attention model \\(Qwen3NextForCausalLM\\)"):
        LLM(target, enforce_eager=True, speculative_config={"method": "draft_model", "model": draft,
                                                            "num_speculative_tokens": 2}, **ENGINE)


def test_fp8_kv_cache_matches_its_oracle(tmp_path, arch="qwen3_5"):
    """kv_cache_dtype="fp8": the full-attention layers' K and V in e4m3 with scales calibrated per head (the
    linear-attention layers' states as without it); transformers with K and V rounded alike
    (``tools/oracle.fp8_kv_attention``) gives the same tokens in eager and graph mode."""
    from nanovllm.tools import oracle
    path = build_checkpoint(tmp_path, arch)
    eager = LLM(path, enforce_eager=True, kv_cache_dtype="fp8", **ENGINE)
    kinds = eager.config.hf_config["layer_types"]
    scales = oracle.engine_kv_scales(eager)
    assert [s is None for s in scales] == [kind == "linear_attention" for kind in kinds]
    full = kinds.index("full_attention")
    assert eager.engine.runner.kv_caches[full][0].dtype == torch.float8_e4m3fn
    assert not torch.equal(scales[full][0], torch.ones_like(scales[full][0]))  # calibrated
    want = hf_greedy(path, PROMPTS[:3], 6, attn_implementation=oracle.fp8_kv_attention(scales))
    assert tokens(eager, PROMPTS[:3], [6, 6, 6]) == want
    graph = LLM(path, graph_batch_sizes=[1, 2, 4], kv_cache_dtype="fp8", **ENGINE)
    assert tokens(graph, PROMPTS[:3], [6, 6, 6]) == want


def test_prefix_hits_restore_snapshots_and_match_a_cold_run(engines):
    """The whole prompt again, a prompt sharing only a system prefix (a hit from the third one on: the second
    snapshots where the shared part ends, moved down to 64 tokens), and most of an earlier prompt: the same tokens
    as transformers, and the hit counter grows by the blocks each hit took.  More snapshot-worthy prefixes than
    snapshot slots, so snapshots are evicted and reused on the way."""
    path, eager, graph = engines
    system = list(range(100, 200))  # 6 full blocks of 16, and 4 tokens
    first = system + [7, 8, 9] * 10  # 130 tokens: its last full block ends at 128, a multiple of 64
    other = list(range(200, 300))  # its last full block ends at 96: snapshotted at 64
    runs = [  # (prompt, tokens the hit must cover)
        (first, 0), (first, 128),
        (system + [50, 51, 52], 0), (system + [60] * 30, 64), (system + [70] * 20, 64),
        (other, 0), (other[:80] + [301], 64)]
    want = hf_greedy(path, [p for p, _ in runs], 5)
    for llm in (eager, graph):
        llm.generate([[1]], SamplingParams(max_tokens=1), use_tqdm=False)  # warm
        bm = llm.engine.block_manager
        for (prompt, hit), expected in zip(runs, want):
            before = bm.cache_hit_tokens
            assert tokens(llm, [prompt], [5]) == [expected]
            assert bm.cache_hit_tokens - before >= hit
        assert bm.snapshots.captured > len(bm.snapshots.by_hash)  # some were evicted and their slots reused


def test_no_snapshot_slots_means_no_hits_and_the_same_tokens(tmp_path):
    path = build_checkpoint(tmp_path, "qwen3_5")
    llm = LLM(path, enforce_eager=True, state_snapshots=0, **ENGINE)
    once = tokens(llm, [PROMPTS[0]] * 2, [4, 4])
    assert once[0] == once[1] == tokens(llm, [PROMPTS[0]], [4])[0]
    assert llm.engine.block_manager.cache_hit_tokens == 0 and llm.engine.block_manager.snapshots.captured == 0


@pytest.mark.parametrize("arch", ["qwen3_5", "qwen3_next"])
def test_online_fp8_matches_its_oracle(tmp_path, arch):
    """quantization="fp8": every projection (the linear-attention inputs too) in float8 with a scale per row, MoE
    experts W8A8; transformers on the dequantized copy (``quant/fp8_oracle.py``) gives the same tokens."""
    from nanovllm.quant import fp8_oracle
    path = build_checkpoint(tmp_path / "plain", arch)
    oracle = fp8_oracle.write_dequantized(path, tmp_path / "oracle", online=torch.float32)
    want = hf_greedy(oracle, PROMPTS[:3], 6, w8a8=True)
    llm = LLM(path, enforce_eager=True, quantization="fp8", **ENGINE)
    assert "in_proj" in " ".join(llm.engine.runner.model.quant_targets())
    assert tokens(llm, PROMPTS[:3], [6, 6, 6]) == want


def test_more_captures_in_one_step_than_snapshot_slots_skip_the_rest(tmp_path):
    """Four prompts prefilled in one step, each with a boundary to snapshot, and one snapshot slot: one is
    captured, the others go without, and every prompt still gets transformers' tokens."""
    path = build_checkpoint(tmp_path, "qwen3_5")
    prompts = [[i] * 80 for i in range(10, 14)]  # each snapshots 64 tokens in
    llm = LLM(path, enforce_eager=True, state_snapshots=1, **dict(ENGINE, max_num_batched_tokens=400))
    assert tokens(llm, prompts, [4] * 4) == hf_greedy(path, prompts, 4)
    assert llm.engine.block_manager.snapshots.captured == 1
