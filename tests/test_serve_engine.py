"""What the server needs from the engine, checked offline: abort while queued steps hold pending tokens, per-step
deltas, logprobs against transformers, stop strings and the chat template in ``LLM``, and exact incremental
detokenization (``TextStream``)."""
import pytest
import torch

from nanovllm import LLM, SamplingParams
from nanovllm.detokenizer import TextStream
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import PENDING_TOKEN, Sequence, SequenceStatus
from serve_helpers import CHAIN_TEXT, build_text_checkpoint

OPTIONS = dict(enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=256)


@pytest.fixture(scope="module")
def text_model(tmp_path_factory):
    return build_text_checkpoint(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="module")
def llm(text_model):
    return LLM(text_model[0], pipeline_depth=3, **OPTIONS)


def test_abort_with_pending_tokens_frees_blocks_and_slot_and_is_never_reported(llm):
    engine = llm.engine
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    alone = llm.generate([[5, 6, 7]], params, use_tqdm=False)[0]["token_ids"]
    free_blocks = engine.block_manager.num_free_blocks
    keep, drop = engine.add_request([5, 6, 7], params), engine.add_request([8, 9] * 20, params)
    for _ in range(4):  # prefill and three decodes queued: the newest tokens are still pending
        engine.step()
    assert drop.token_ids[-1] == PENDING_TOKEN and drop.block_table
    assert engine.abort(drop) and not engine.abort(drop)
    assert drop.status is SequenceStatus.FINISHED and drop.finish_reason == "abort"
    assert PENDING_TOKEN not in drop.token_ids and drop.block_table == [] and drop.token_slot is None
    reported = []
    while engine.has_work():
        outputs = engine.step().outputs
        reported += [out.seq_id for out in outputs if out.finish_reason is not None]
        assert drop.seq_id not in [out.seq_id for out in outputs]
    assert reported == [keep.seq_id] and keep.completion_token_ids == alone
    assert engine.block_manager.num_free_blocks == free_blocks
    assert sorted(engine.scheduler.free_slots) == list(range(llm.config.max_num_seqs))


def test_abort_of_a_waiting_sequence_and_step_outputs_carry_each_token_once(llm):
    engine = llm.engine
    seq = engine.add_request([5, 6], SamplingParams(max_tokens=3))
    assert engine.abort(seq) and not engine.scheduler.has_work() and seq.completion_token_ids == []
    seq = engine.add_request([5, 6], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    seen = []
    while engine.has_work():
        seen += [(out.token_ids, out.finish_reason) for out in engine.step().outputs if out.seq_id == seq.seq_id]
    # one resolved token per step, in order; the finish reason on the last output only
    assert [t for ids, _ in seen for t in ids] == seq.completion_token_ids and all(len(ids) == 1 for ids, _ in seen)
    assert [r for _, r in seen] == [None] * 5 + ["length"]


def test_abort_is_safe_for_a_preempted_sequence_with_pending_tokens():
    scheduler = Scheduler(BlockManager(16, 16), 4, 256, 256, (2,), mixed_prefill=False)
    seq = Sequence(0, [5] * 10, SamplingParams(max_tokens=8, ignore_eos=True), seed=0)
    scheduler.add(seq)
    prefill = scheduler.schedule()
    scheduler.advance(prefill)
    scheduler._preempt(seq)  # back in the queue, its sampled token still pending
    assert scheduler.abort(seq) and seq.token_ids == [5] * 10
    assert scheduler.resolve(prefill, [7]) == [] and not scheduler.has_work()
    assert scheduler.block_manager.num_free_blocks == 16


def test_logprobs_are_the_models_log_softmax(llm, text_model):
    import transformers
    prompt = [5, 6, 7, 8]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=6, logprobs=4), use_tqdm=False)[0]
    model = transformers.AutoModelForCausalLM.from_pretrained(text_model[0], dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out["token_ids"]])).logits[0, len(prompt) - 1:-1]
    expected = logits.log_softmax(-1)
    assert len(out["logprobs"]) == len(out["token_ids"]) == 6
    for pos, (token, entry) in enumerate(zip(out["token_ids"], out["logprobs"])):
        assert next(iter(entry)) == token  # the sampled token first, then the 4 most likely
        top = expected[pos].topk(4)
        assert set(entry) == {token, *top.indices.tolist()}
        for t, value in entry.items():
            assert value == pytest.approx(expected[pos, t].item(), abs=1e-4)


def test_stop_strings_and_chat_offline(llm):
    chat = [{"role": "user", "content": "hello"}]
    whole = llm.chat(chat, SamplingParams(temperature=0, max_tokens=40), use_tqdm=False)[0]
    assert whole["text"] == CHAIN_TEXT and whole["finish_reason"] == "stop"
    cut = llm.chat(chat, SamplingParams(temperature=0, max_tokens=40, stop=["☃𝄞", "Paris"]), use_tqdm=False)[0]
    assert cut["text"] == "Zoë: " and cut["finish_reason"] == "stop"
    assert cut["token_ids"] == llm.tokenizer.encode("Zoë: ☃𝄞")  # up to the token that completed the stop string
    short = llm.chat(chat, SamplingParams(temperature=0, max_tokens=3, stop=["Paris"]), use_tqdm=False)[0]
    assert short["finish_reason"] == "length"  # ends inside "ë": the text is the one-shot decode's
    assert short["text"] == llm.tokenizer.decode(short["token_ids"]) == "Zo\ufffd"
    plain = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert set(plain[0]) == {"text", "token_ids", "finish_reason", "prompt_logprobs"}
    assert plain[0]["finish_reason"] == "length" and plain[0]["prompt_logprobs"] is None


def test_text_stream_is_exact_for_characters_split_across_tokens(llm):
    tok = llm.tokenizer
    text = "Zoë ☃𝄞 and more ünïcödé 🙂 text"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # characters really are split into byte tokens
    stream = TextStream(tok)
    pieces = [stream.push([t]) for t in ids] + [stream.finish()]
    assert "".join(pieces) == text == stream.text
    assert not any("\ufffd" in p for p in pieces)  # every character came out whole
    broken = TextStream(tok)  # a completion that ends inside a character: the one-shot decode's text
    tail = "".join([broken.push(ids[:3])]) + broken.finish()
    assert tail == tok.decode(ids[:3]) and tail.endswith("\ufffd")


def test_text_stream_holds_back_a_possible_stop_string_and_never_takes_text_back(llm):
    tok = llm.tokenizer
    ids = tok.encode("one two three four")
    stream = TextStream(tok, stop=("three",))
    shown = ""
    for t in ids:
        shown += stream.push([t])
        assert "thr" not in shown  # the start of the stop string is not shown before it is known
    assert stream.stopped and stream.text == "one two " and shown + stream.finish() == "one two "
    assert stream.num_tokens == len(tok.encode("one two three"))


def test_a_stop_token_resolved_after_the_length_finish_comes_with_the_finish(llm, text_model):
    """With steps queued, a sequence can be finished on length at launch and then resolve a stop token still
    pending: the server must get that token with the finish (reason "stop"), not earlier as ordinary text."""
    from nanovllm.entrypoints.choices import Choice
    from nanovllm.entrypoints.engine_core import EngineCore
    chain, m = text_model[1], 8
    stop = chain[m - 1]  # the completion's second-to-last token: pending when the last one is launched
    params = SamplingParams(temperature=0, max_tokens=m, stop_token_ids=[stop])
    core = EngineCore(llm.engine)
    core.apply(("add", 7, [chain[0]], [params], None))
    sent = []
    while llm.engine.has_work():
        sent += [delta for rid, _, delta in core.step() if rid == 7]
    assert [t for d in sent for t in d.token_ids] == chain[1:m]
    assert sent[-1].finish_reason == "stop" and sent[-1].token_ids[-1] == stop
    assert all(stop not in d.token_ids for d in sent[:-1])
    assert [len(d.token_ids) for d in sent] == [1] * (m - 1)  # the tokens before it still come one per step
    choice = Choice(0, llm.tokenizer, params)
    updates = [choice.add(d) for d in sent]
    assert choice.finish_reason == "stop" and choice.completion.token_ids == chain[1:m]
    assert "".join(u.text for u in updates) == llm.tokenizer.decode(chain[1:m - 1], skip_special_tokens=True)


@pytest.mark.parametrize("decode_stream", [True, False])
def test_text_stream_of_a_tokenizer_that_cleans_up_spaces_loses_no_text(text_model, decode_stream, monkeypatch):
    """Cleaning up spaces (" ," -> ",") rewrites text already shown once a later token arrives, so the stream
    decodes with it off, in both of its decoders, rather than stall at the rewritten spot."""
    import nanovllm.detokenizer
    from serve_helpers import build_tokenizer
    if not decode_stream:
        monkeypatch.setattr(nanovllm.detokenizer, "DecodeStream", None)
    tok = build_tokenizer(text_model[0] + "/cleanup")
    tok.clean_up_tokenization_spaces = True
    tok.clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output = True  # transformers >= 5
    ids = tok.encode("Hello") + tok.encode(" ") + tok.encode(",") + tok.encode(" world and more")
    assert tok.decode(ids) == "Hello, world and more"  # the clean-up is in effect
    stream = TextStream(tok)
    shown = "".join(stream.push([t]) for t in ids) + stream.finish()
    assert shown == stream.text == "Hello , world and more"
