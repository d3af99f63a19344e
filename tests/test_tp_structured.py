"""Structured outputs and penalties under tensor parallelism on the CPU (gloo): every rank compiles the grammars and
fills the masks itself, so two ranks must give, token for token, what one gives, for constrained, penalised and
plain requests in one batch, greedy and sampled, and every constrained text must hold."""
import json
import re

import pytest

pytest.importorskip("xgrammar")

from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.sampling_params import StructuredOutputsParams  # noqa: E402

ENGINE = dict(max_num_seqs=8, kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=256, enforce_eager=True)
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "n"], "additionalProperties": False}


def _params():
    def constrained(temperature=0.0, **spec):
        return SamplingParams(temperature=temperature, max_tokens=48, seed=5,
                              structured_outputs=StructuredOutputsParams(**spec))
    return [constrained(json=SCHEMA), constrained(temperature=0.9, json=SCHEMA),
            constrained(choice=["red", "green", "blue"]), constrained(regex=r"[a-z]{2,5}-\d{2}"),
            SamplingParams(temperature=0.8, max_tokens=12, seed=3, frequency_penalty=1.0, repetition_penalty=1.3),
            SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)]


def test_two_ranks_give_what_one_gives(tmp_path):
    from serve_helpers import build_text_checkpoint
    path = build_text_checkpoint(tmp_path)[0]
    prompts = [[5, 9, 13, 2, 7], [11, 3], [4, 4, 8, 15], [16, 23, 42], [1, 2, 3, 4, 5, 6], [7, 8]]
    one = [o["token_ids"] for o in LLM(path, **ENGINE).generate(prompts, _params(), use_tqdm=False)]
    llm = LLM(path, tensor_parallel_size=2, **ENGINE)
    try:
        outs = llm.generate(prompts, _params(), use_tqdm=False)
    finally:
        llm.close()
    assert [o["token_ids"] for o in outs] == one
    for out in outs[:2]:
        value = json.loads(out["text"])
        assert set(value) == {"name", "n"} and len(value["name"]) <= 6 and 0 <= value["n"] <= 99
    assert outs[2]["text"] in ("red", "green", "blue")
    assert re.fullmatch(r"[a-z]{2,5}-\d{2}", outs[3]["text"])
