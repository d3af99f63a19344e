"""Multi-LoRA with the engine's variants on the CPU, PEFT as the oracle (``test_lora.py``'s adapters): a batch mixing
three adapters and the base gives transformers + PEFT's greedy float32 tokens with two tensor-parallel ranks over
gloo, with ``quantization="fp8"`` and with a GPTQ int4 checkpoint (the oracle applies PEFT on the checkpoint whose
weights are their FP8 or int4 values dequantized, ``quant/registry.write_oracle``), and with n-gram speculation on
repetitive prompts, eager and in graph mode."""
import shutil

import pytest
import torch

from lora_helpers import ENGINE, PROMPTS, build_family, expected, generate
from nanovllm import LLM, LoRARequest
from nanovllm.quant import fp8_oracle
from nanovllm.quant.int4_checkpoint import quantize_checkpoint_int4
from nanovllm.quant.registry import write_oracle

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def qwen3(tmp_path_factory):
    base, paths = build_family(str(tmp_path_factory.mktemp("qwen3")), "qwen3")
    return base, {name: LoRARequest(name, i + 1, p) for i, (name, p) in enumerate(sorted(paths.items()))}


def mixed(a):
    return [a["a1"], None, a["a2"], a["a3"]]


def test_two_tensor_parallel_ranks(qwen3):
    base, a = qwen3
    llm = LLM(base, tensor_parallel_size=2, **ENGINE)
    try:
        assert generate(llm, PROMPTS, mixed(a)) == expected(base, mixed(a), PROMPTS)
        llm.engine.remove_lora(a["a1"].lora_int_id)  # mirrored to the other rank
        llm.engine.add_lora(LoRARequest("again", 5, a["a3"].lora_path))  # so is adding one (the server's load)
        requests = [LoRARequest("again", 5, a["a3"].lora_path), a["a2"], None, a["a1"]]
        assert generate(llm, PROMPTS, requests) == expected(base, requests, PROMPTS)
    finally:
        llm.close()


def test_fp8_base_weights(qwen3, tmp_path):
    base, a = qwen3
    oracle = fp8_oracle.write_dequantized(base, tmp_path / "oracle", online=torch.float32)
    llm = LLM(base, quantization="fp8", **ENGINE)
    assert generate(llm, PROMPTS, mixed(a)) == expected(oracle, mixed(a), PROMPTS)


def test_int4_base_weights(qwen3, tmp_path):
    base, a = qwen3
    int4 = shutil.copytree(base, tmp_path / "gptq")
    quantize_checkpoint_int4(int4, method="gptq", group=32)  # in place
    oracle = write_oracle(int4, tmp_path / "oracle")
    llm = LLM(str(int4), **ENGINE)
    assert generate(llm, PROMPTS, mixed(a)) == expected(oracle, mixed(a), PROMPTS)


@pytest.mark.parametrize("eager", [True, pytest.param(False, marks=pytest.mark.slow)], ids=["eager", "graph"])
def test_ngram_speculation(qwen3, eager):
    base, a = qwen3
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
    llm = LLM(base, speculative_config=spec, **dict(ENGINE, enforce_eager=eager))
    llm.engine.spec_gate.adaptive = False  # propose wherever it can, paying or not
    prompts = [[5, 9, 33, 7] * 6, [3, 4, 5, 3, 4, 5, 3, 4], [200, 17, 17, 3] * 5, [8, 8, 8, 8, 8, 8]]
    want = expected(base, mixed(a), prompts, 24)
    assert generate(llm, prompts, mixed(a), 24) == want
    assert llm.engine.stats["spec_accepted_tokens"] > 0  # drafts were accepted, not only proposed
