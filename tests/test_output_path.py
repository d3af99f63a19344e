"""One output path: ``LLM.generate`` and the server turn the engine's step outputs into the same text, tokens and
finish reasons (``nanovllm/completion.py``), with one rule for stop tokens and stop strings."""
import pytest

from nanovllm import LLM, SamplingParams
from nanovllm.detokenizer import decode
from nanovllm.entrypoints.choices import Choice
from nanovllm.entrypoints.engine_core import EngineCore
from serve_helpers import build_text_checkpoint


@pytest.fixture(scope="module")
def chain_llm(tmp_path_factory):
    path, chain = build_text_checkpoint(tmp_path_factory.mktemp("text"))
    llm = LLM(path, enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=256)
    return llm, chain


def served(llm, prompt, params) -> dict:
    """The server's view of one request: its engine core's outputs through a ``Choice``, joined."""
    core = EngineCore(llm.engine)
    core.apply(("add", 1, prompt, [params], None))
    choice = Choice(0, llm.tokenizer, params)
    text, tokens = "", []
    while llm.engine.has_work():
        for _, _, out in core.step():
            if choice.finish_reason is not None:
                continue
            update = choice.add(out)
            text, tokens = text + update.text, tokens + update.token_ids
            if choice.completion.stopped_by_string and out.finish_reason is None:
                core.apply(("abort", 1, [0]))
    return {"text": text, "token_ids": tokens, "finish_reason": choice.finish_reason}


def cases(chain):
    return {
        "eos": SamplingParams(temperature=0, max_tokens=40),
        "length": SamplingParams(temperature=0, max_tokens=4),
        "stop token": SamplingParams(temperature=0, max_tokens=40, stop_token_ids=[chain[5]]),
        "stop string": SamplingParams(temperature=0, max_tokens=40, stop=["fine"]),
        "logprobs": SamplingParams(temperature=0, max_tokens=6, logprobs=2),
    }


@pytest.mark.parametrize("case", ["eos", "length", "stop token", "stop string", "logprobs"])
def test_offline_and_server_outputs_are_equal(chain_llm, case):
    llm, chain = chain_llm
    params = cases(chain)[case]
    offline = llm.generate([chain[:1]], params, use_tqdm=False)[0]
    online = served(llm, chain[:1], params)
    assert {k: offline[k] for k in online} == online


def test_a_stop_tokens_text_is_dropped_and_its_id_kept(chain_llm):
    llm, chain = chain_llm
    out = llm.generate([chain[:1]], cases(chain)["stop token"], use_tqdm=False)[0]
    assert out["finish_reason"] == "stop" and out["token_ids"] == chain[1:6]
    assert out["text"] == decode(llm.tokenizer, chain[1:5]) and out["text"]


def test_a_stop_string_cuts_the_text_before_it_and_the_tokens_after_the_one_that_completed_it(chain_llm):
    llm, chain = chain_llm
    out = llm.generate([chain[:1]], cases(chain)["stop string"], use_tqdm=False)[0]
    assert out["finish_reason"] == "stop" and out["text"] == "Zoë: ☃𝄞 "
    assert "fine" in decode(llm.tokenizer, out["token_ids"]) and "fine" not in decode(llm.tokenizer,
                                                                                         out["token_ids"][:-1])
    assert not llm.engine.has_work() and llm.engine.block_manager.num_free_blocks == 64
