"""Speculative decoding with a draft model (``speculative_config`` method ``draft_model``, ``engine/drafter.py``):
the option's errors; on tiny Qwen3, Llama and Qwen3-MoE targets, greedy and seeded outputs equal those without
speculation in eager and graph mode, with a smaller draft of the same vocabulary and with the target drafting for
itself (which must keep every draft: stale draft KV would lose some); every proposal equals transformers' greedy
continuation by the draft model; preemption, prefix hits, stop tokens and ``max_tokens``; both caches sized in one
budget; two tensor-parallel ranks over gloo."""
import json

import pytest
import torch

from conftest import build_checkpoint
from nanovllm import LLM, SamplingParams
from nanovllm.speculative import SpeculativeConfig
from test_speculative import ENGINE, PROMPTS

GREEDY = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
SEEDED = SamplingParams(temperature=0.9, seed=7, max_tokens=30, ignore_eos=True)


def draft_of(path, k=3):
    return {"method": "draft_model", "model": path, "num_speculative_tokens": k}


@pytest.fixture(scope="module", params=["qwen3", pytest.param("llama", marks=pytest.mark.slow),
                                        pytest.param("qwen3_moe", marks=pytest.mark.slow)])
def models(request, tmp_path_factory):
    """(target, draft): the draft has one layer and other weights, the same vocabulary."""
    root = tmp_path_factory.mktemp(request.param)
    return (build_checkpoint(root / "target", request.param),
            build_checkpoint(root / "draft", request.param, seed=1, num_hidden_layers=1))


def generate(path, params, speculative=None, eager=True, prompts=PROMPTS, spy=None, **kw):
    llm = LLM(path, enforce_eager=eager, speculative_config=speculative, **{**ENGINE, **kw})
    try:
        if spy is not None:
            spy(llm.engine.runner.drafter)
        outs = llm.generate(prompts, params, use_tqdm=False)
        return [o["token_ids"] for o in outs], dict(llm.engine.stats)
    finally:
        llm.close()


def test_decode_buckets_hold_a_verify_steps_rows():
    from nanovllm.config import normalize_graph_batch_sizes
    assert normalize_graph_batch_sizes(None, 16, 5) == (1, 2, 4, 8, 16, 32, 48, 64, 80)
    assert normalize_graph_batch_sizes([4, 20], 4, 5) == (4, 20)
    with pytest.raises(ValueError, match=r"32 exceeds max_num_seqs=4 x \(1 \+ num_speculative_tokens\) = 20 rows"):
        normalize_graph_batch_sizes([4, 32], 4, 5)


def test_bad_draft_configs_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="model must be the draft model's checkpoint directory, got None"):
        SpeculativeConfig.parse({"method": "draft_model", "num_speculative_tokens": 2})
    with pytest.raises(ValueError, match="got '/no/such/dir'"):
        SpeculativeConfig.parse(draft_of("/no/such/dir"))
    with pytest.raises(ValueError, match=r"unknown keys \['prompt_lookup_max'\] for method 'draft_model'"):
        SpeculativeConfig.parse({**draft_of(str(tmp_path)), "prompt_lookup_max": 2})
    target = build_checkpoint(tmp_path / "target", "qwen3")
    other_vocab = build_checkpoint(tmp_path / "vocab", "qwen3", vocab_size=512)
    with pytest.raises(ValueError, match="has vocab_size 512, the model .* 384"):
        LLM(target, enforce_eager=True, speculative_config=draft_of(other_vocab), **ENGINE)
    short = build_checkpoint(tmp_path / "short", "qwen3", max_position_embeddings=128)
    with pytest.raises(ValueError, match="holds 128 positions, fewer than max_model_len=256"):
        LLM(target, enforce_eager=True, speculative_config=draft_of(short), **ENGINE)
    for path, vocab in ((target, {"a": 0, "b": 1}), (short, {"a": 0, "c": 1})):
        with open(f"{path}/tokenizer.json", "w") as f:
            json.dump({"model": {"vocab": vocab}, "added_tokens": []}, f)
    with pytest.raises(ValueError, match="has another tokenizer than"):
        LLM(target, enforce_eager=True, speculative_config=draft_of(short), **{**ENGINE, "max_model_len": 128})


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graph"])
def test_outputs_do_not_change_and_a_self_draft_is_always_kept(models, eager):
    target, draft = models
    kw = {} if eager else {"graph_batch_sizes": [4, 16]}  # a verify step's 16 rows fit a graph past max_num_seqs
    for params in (GREEDY, SEEDED):
        plain, _ = generate(target, params, eager=eager)
        drafted, stats = generate(target, params, draft_of(draft), eager=eager, **kw)
        assert drafted == plain
        assert stats["spec_drafts"] > 0 and stats["spec_proposed_tokens"] > 0
        own, stats = generate(target, params, draft_of(target), eager=eager, **kw)
        assert own == plain
        assert stats["spec_accepted_tokens"] == stats["spec_proposed_tokens"] > 0
        assert stats["spec_accepted_by_position"] == stats["spec_proposed_by_position"]


def test_every_proposal_is_the_draft_models_greedy_continuation(tmp_path):
    """A draft close to the target (its weights scaled), so some drafts are kept and some not: each proposal, read
    as it leaves the drafter, equals transformers' float32 greedy continuation by the draft of the same tokens."""
    import transformers
    target = build_checkpoint(tmp_path / "target", "qwen3")
    draft = build_checkpoint(tmp_path / "draft", "qwen3", std=0.07)
    seen = []

    def spy(drafter):
        inner = drafter.propose_all

        def propose_all(seqs, limits):
            out = inner(seqs, limits)
            seen.extend((list(s.token_ids), p) for s, p in zip(seqs, out) if p)
            return out
        drafter.propose_all = propose_all

    plain, _ = generate(target, GREEDY)
    drafted, stats = generate(target, GREEDY, draft_of(draft), spy=spy)
    assert drafted == plain
    assert 0 < stats["spec_accepted_tokens"] < stats["spec_proposed_tokens"]
    model = transformers.AutoModelForCausalLM.from_pretrained(draft, dtype=torch.float32).eval()
    with torch.no_grad():
        for tokens, proposal in seen:
            greedy = list(tokens)
            for _ in proposal:  # forward passes: ``generate`` applies the checkpoint's generation config
                greedy.append(int(model(torch.tensor([greedy])).logits[0, -1].argmax()))
            assert greedy[len(tokens):] == proposal
    assert len(seen) == stats["spec_drafts"]


def test_preemption_prefix_hits_stops_and_max_tokens(tmp_path):
    """12 blocks for four sequences of up to 112 tokens: sequences are preempted and recomputed from the prefix
    cache, and their draft KV with them; a stop token and a short ``max_tokens`` end sequences mid-proposal."""
    target = build_checkpoint(tmp_path / "target", "qwen3")
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    tight = dict(num_kvcache_blocks=12, max_model_len=192)
    plain, _ = generate(target, params, **tight)
    own, stats = generate(target, params, draft_of(target, k=5), **tight)
    assert own == plain and stats["preemptions"] > 0
    assert stats["spec_accepted_tokens"] == stats["spec_proposed_tokens"]
    stop = plain[0][9]
    params = [SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[stop]),
              SamplingParams(temperature=0, max_tokens=7, ignore_eos=True)] * 2
    plain, _ = generate(target, params)
    own, _ = generate(target, params, draft_of(target, k=5))
    assert own == plain and own[0][-1] == stop and len(own[1]) == 7


def test_both_caches_share_one_budget(tmp_path):
    """Where memory is not measured (CPU) the KV budget is fixed: a draft's cache takes its share of every block."""
    from nanovllm.engine.kv_cache import DEFAULT_KV_BYTES
    target = build_checkpoint(tmp_path / "target", "qwen3")
    draft = build_checkpoint(tmp_path / "draft", "qwen3", num_hidden_layers=1)
    kw = {**ENGINE, "num_kvcache_blocks": None}
    llm = LLM(target, enforce_eager=True, speculative_config=draft_of(draft), **kw)
    runner = llm.engine.runner
    per_block = runner.kv_spec.bytes_per_block + runner.drafter.kv_spec.bytes_per_block
    assert runner.drafter.kv_spec.bytes_per_block * 2 == runner.kv_spec.bytes_per_block
    assert runner.num_blocks == DEFAULT_KV_BYTES // per_block
    assert runner.describe()["draft"]["model"] == draft
    llm.close()


def test_a_draft_that_does_not_fit_is_named(tmp_path, monkeypatch):
    from nanovllm.engine import kv_cache
    target = build_checkpoint(tmp_path / "target", "qwen3")
    monkeypatch.setattr(kv_cache, "DEFAULT_KV_BYTES", 20 * 2 * 2 * 2 * 32 * 16 * 4)  # 20 blocks of the target's
    kw = {**ENGINE, "num_kvcache_blocks": None}
    with pytest.raises(ValueError, match="holds 10 blocks .* needs 16 .the draft model's cache takes 16384 of each "
                                         "block's 32768 bytes"):
        LLM(target, enforce_eager=True, speculative_config=draft_of(target), **kw)


def test_two_ranks_draft_as_one(tmp_path):
    """TP=2 over gloo: the draft is split like the target and every rank proposes the same drafts."""
    target = build_checkpoint(tmp_path / "target", "qwen3")
    draft = build_checkpoint(tmp_path / "draft", "qwen3", std=0.07)
    plain, _ = generate(target, [GREEDY, SEEDED] * 2)
    drafted, stats = generate(target, [GREEDY, SEEDED] * 2, draft_of(draft), tensor_parallel_size=2)
    assert drafted == plain and stats["spec_accepted_tokens"] > 0
