"""``LLM.embed`` against transformers: a tiny random Qwen3 (float32), its ``AutoModel`` last hidden state pooled by
sentence-transformers' rule (the last token, or the mean over the prompt) and L2-normalised, within 1e-5; in eager
and graph mode, with prompts longer than a prefill step (chunked: MEAN sums across chunks, LAST takes the last
chunk's last token), batched with generate requests in one engine, after prefix-cache hits, and with the pooler
read from sentence-transformers' ``modules.json``, ``pooler_config`` or ``PoolingParams``."""
import json
import os

import pytest
import torch

from conftest import build_checkpoint
from nanovllm import LLM, PoolingParams, SamplingParams
from nanovllm.config import EngineConfig
from nanovllm.engine.outputs import SequenceOutput
from nanovllm.pooling_params import PoolerConfig, resolve_pooler

CHUNK = 48  # max_num_batched_tokens: PROMPTS[1] and [3] take two prefill steps or more
PROMPTS = [[5, 6, 7], list(range(10, 110)), [3] * 20, [(7 * i) % 300 + 4 for i in range(61)]]
COMMON = dict(max_num_seqs=7, kvcache_block_size=16, num_kvcache_blocks=96, max_model_len=256,
              max_num_batched_tokens=CHUNK)


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("embed"), "qwen3", is_matryoshka=True)


@pytest.fixture(scope="module")
def hidden(path):
    """transformers' final hidden states [len, H] of each prompt (float32, one prompt at a time)."""
    import transformers
    model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return {tuple(p): model(torch.tensor([p])).last_hidden_state[0] for p in PROMPTS}


def want(hidden, prompt, kind: str, normalize: bool = True, dimensions: int | None = None) -> torch.Tensor:
    h = hidden[tuple(prompt)]
    v = h[-1] if kind == "LAST" else h.mean(0)
    v = v[:dimensions] if dimensions else v
    return torch.nn.functional.normalize(v, dim=-1) if normalize else v


def close(got, expected) -> None:
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float32), expected, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def eager(path):
    return LLM(path, enforce_eager=True, **COMMON)


@pytest.fixture(scope="module")
def graph(path):
    """Graph mode with prefill steps padded to 16 or 48 tokens (uncaptured on the CPU: the same padding and step
    function as CUDA's captured prefill graphs)."""
    llm = LLM(path, graph_batch_sizes=[1, 2, 4], prefill_graph_sizes=[16, CHUNK], **COMMON)
    assert llm.engine.runner.mode == "graph"
    return llm


@pytest.mark.parametrize("mode", ["eager", "graph"])
@pytest.mark.parametrize("kind", ["LAST", "MEAN"])
def test_embeddings_match_transformers_in_chunks_and_batches(request, hidden, mode, kind):
    llm = request.getfixturevalue(mode)
    outs = llm.embed(PROMPTS, PoolingParams(pooling_type=kind), use_tqdm=False)
    assert [o.prompt_token_ids for o in outs] == PROMPTS and [o.request_id for o in outs] == ["0", "1", "2", "3"]
    for prompt, out in zip(PROMPTS, outs):
        assert out.finished and out.outputs.hidden_size == 64 and isinstance(out.outputs.embedding, list)
        close(out.outputs.embedding, want(hidden, prompt, kind))
    alone = llm.embed(PROMPTS[1], PoolingParams(pooling_type=kind), use_tqdm=False)  # one request, three chunks
    close(alone[0].outputs.embedding, want(hidden, PROMPTS[1], kind))


def test_pooling_and_generate_requests_share_steps(graph, hidden, monkeypatch):
    """Pooling requests prefilled in the same steps as generate requests (one with logprobs: a step variant), each
    getting its own result; the generated tokens are those generate gives alone, and nothing is lost."""
    engine = graph.engine
    params = [SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=5, ignore_eos=True, logprobs=2)]
    alone = [graph.generate([p], s, use_tqdm=False)[0]["token_ids"] for p, s in zip(PROMPTS[:2], params)]
    free = engine.block_manager.num_free_blocks
    gen = [engine.add_request(p, s) for p, s in zip(PROMPTS[:2], params)]
    pool = [engine.add_request(p, PoolingParams(pooling_type=k)) for p, k in zip(PROMPTS, ["MEAN", "LAST"] * 2)]
    kinds, schedule = [], engine.scheduler.schedule

    def recorded(*args, **kwargs):  # which kinds of request each step holds
        batch = schedule(*args, **kwargs)
        kinds.append({s.pooling is not None for s in batch.seqs})
        return batch

    monkeypatch.setattr(engine.scheduler, "schedule", recorded)
    outputs: dict[int, list[SequenceOutput]] = {}
    while engine.has_work():
        for out in engine.step().outputs:
            outputs.setdefault(out.seq_id, []).append(out)
    assert {True, False} in kinds
    for seq, tokens in zip(gen, alone):
        assert seq.completion_token_ids == tokens and outputs[seq.seq_id][-1].finish_reason == "length"
    for seq, prompt, kind in zip(pool, PROMPTS, ["MEAN", "LAST"] * 2):
        (out,) = outputs[seq.seq_id]  # one output, with no tokens
        assert out.token_ids == [] and out.finish_reason == "stop" and seq.token_ids == prompt
        close(out.embedding, want(hidden, prompt, kind))
    assert engine.block_manager.num_free_blocks == free
    assert sorted(engine.scheduler.free_slots) == list(range(7))


def test_last_takes_prefix_cache_hits_and_mean_takes_none(eager, hidden):
    bm = eager.engine.block_manager
    prompt = PROMPTS[3]
    eager.embed(prompt, use_tqdm=False)
    before = bm.cache_hit_tokens
    (last,) = eager.embed(prompt, use_tqdm=False)
    assert bm.cache_hit_tokens - before == (len(prompt) - 1) // 16 * 16  # every full block before the last token
    close(last.outputs.embedding, want(hidden, prompt, "LAST"))
    before = bm.cache_hit_tokens
    (mean,) = eager.embed(prompt, PoolingParams(pooling_type="MEAN"), use_tqdm=False)
    assert bm.cache_hit_tokens == before
    close(mean.outputs.embedding, want(hidden, prompt, "MEAN"))


def test_dimensions_normalize_and_truncation(eager, hidden):
    p = PROMPTS[3]
    (out,) = eager.embed([p], PoolingParams(dimensions=16), use_tqdm=False)
    close(out.outputs.embedding, want(hidden, p, "LAST", dimensions=16))
    (out,) = eager.embed([p], PoolingParams(normalize=False, pooling_type="MEAN"), use_tqdm=False)
    close(out.outputs.embedding, want(hidden, p, "MEAN", normalize=False))
    (cut,) = eager.embed([list(range(50)) + PROMPTS[0]], truncate_prompt_tokens=3, use_tqdm=False)
    assert cut.prompt_token_ids == PROMPTS[0]
    close(cut.outputs.embedding, want(hidden, PROMPTS[0], "LAST"))


def test_an_aborted_pooling_request_reports_nothing_and_frees_its_blocks(eager):
    engine = eager.engine
    free = engine.block_manager.num_free_blocks
    seq = engine.add_request(PROMPTS[1], PoolingParams(pooling_type="MEAN"))
    engine.step()  # its first chunk
    assert seq.pool_sum is not None and engine.abort(seq)
    reported = []
    while engine.has_work():
        reported += engine.step().outputs
    assert reported == [] and seq.embedding is None and engine.block_manager.num_free_blocks == free


def _sentence_transformers(path, mode: str, normalize: bool) -> None:
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    with open(os.path.join(path, "modules.json"), "w") as f:
        json.dump(modules, f)
    os.makedirs(os.path.join(path, "1_Pooling"), exist_ok=True)
    modes = {k: k == mode for k in ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_lasttoken")}
    with open(os.path.join(path, "1_Pooling", "config.json"), "w") as f:
        json.dump({"word_embedding_dimension": 64, **modes}, f)


def test_the_pooler_comes_from_sentence_transformers_modules_then_pooler_config(tmp_path, path, hidden):
    st = build_checkpoint(tmp_path / "st", "qwen3", is_matryoshka=True)  # the same weights (same seed) as ``path``
    assert resolve_pooler(st) == PoolerConfig("LAST", True)  # no modules.json: the default
    _sentence_transformers(st, "pooling_mode_mean_tokens", normalize=False)
    assert resolve_pooler(st) == PoolerConfig("MEAN", False, "from the checkpoint's 1_Pooling/config.json")
    llm = LLM(st, enforce_eager=True, **COMMON)
    try:
        close(llm.embed(PROMPTS[1], use_tqdm=False)[0].outputs.embedding, want(hidden, PROMPTS[1], "MEAN", False))
    finally:
        llm.close()
    llm = LLM(st, enforce_eager=True, pooler_config='{"pooling_type": "last", "normalize": true}', **COMMON)
    try:
        close(llm.embed(PROMPTS[1], use_tqdm=False)[0].outputs.embedding, want(hidden, PROMPTS[1], "LAST"))
    finally:
        llm.close()
    _sentence_transformers(st, "pooling_mode_cls_token", normalize=True)
    assert resolve_pooler(st).pooling_type == "CLS"  # kept: generate still works, embed refuses it by name
    with pytest.raises(ValueError, match="pooling type 'CLS' .*1_Pooling/config.json.* not supported"):
        PoolingParams().resolve(resolve_pooler(st), {})


@pytest.mark.parametrize("override,error", [
    ({"pooling_type": "CLS"}, "pooler_config's pooling_type 'CLS' is not supported"),
    ({"pooling_type": "ALL"}, "'ALL' is not supported"),
    ({"pooling": "MEAN"}, "unknown key.*'pooling'"),
    ({"normalize": 1}, "normalize must be a bool"),
    ("{not json", "not valid JSON"),
])
def test_bad_pooler_configs_are_refused_by_name(path, override, error):
    with pytest.raises((TypeError, ValueError), match=error):
        EngineConfig(path, pooler_config=override)


def test_dimensions_follow_vllms_matryoshka_rule():
    pooler = PoolerConfig()
    with pytest.raises(ValueError, match="does not support matryoshka representation"):
        PoolingParams(dimensions=8).resolve(pooler, {"hidden_size": 64})
    with pytest.raises(ValueError, match=r"only supports \[16, 32\] matryoshka dimensions"):
        PoolingParams(dimensions=8).resolve(pooler, {"hidden_size": 64, "matryoshka_dimensions": [16, 32]})
    with pytest.raises(ValueError, match="exceeds the model's hidden size 64"):
        PoolingParams(dimensions=65).resolve(pooler, {"hidden_size": 64, "is_matryoshka": True})
    with pytest.raises(ValueError, match="positive int"):
        PoolingParams(dimensions=0)
    assert PoolingParams(dimensions=16).resolve(pooler, {"matryoshka_dimensions": [16]}).dimensions == 16
    with pytest.raises(ValueError, match="pooling_type 'STEP' is not supported"):
        PoolingParams(pooling_type="STEP")


def test_embed_refuses_bad_arguments_before_queueing_anything(eager):
    engine = eager.engine
    with pytest.raises(ValueError, match="one PoolingParams or a list of 2"):
        eager.embed([[1], [2]], [PoolingParams()])
    with pytest.raises(ValueError, match="more than max_model_len=256"):
        eager.embed([[1], [2] * 300])
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        eager.embed([[]])
    assert not engine.has_work()
