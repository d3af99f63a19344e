"""``kv_cache_dtype="fp8"`` across the capabilities beyond dense and Qwen3-MoE/Mixtral (``test_kv_fp8.py``):
MiniCPM4, Qwen2-MoE's shared expert, vision-language, tensor parallelism, expert offload, graph mode with
preemption, prefix hits and chunked prefill, and the server's flag.

The oracle is ``test_kv_fp8.py``'s: transformers in float32 with an attention function
(``tools/oracle.py:fp8_kv_attention``) that rounds each layer's K and V as our cache does with our engine's scales.
MiniCPM's oracle is transformers' Llama on the equivalent checkpoint (``tools/minicpm.py:to_llama``).  It folds
``scale_emb`` into the embedding and ``scale_depth / sqrt(layers)`` into ``o_proj`` and ``down_proj`` exactly as our
model does, so the residual stream, and with it every layer's K and V, is the same on both sides, with no constant
factor between them; the two differ only at the LM head (our final norm is divided by the width ratio, the oracle's
head is), which the cache never sees.  So the same scales round the same values.
"""
import pytest
import torch

from conftest import build_checkpoint, build_minicpm_checkpoint, hf_greedy
from nanovllm import LLM
from nanovllm.tools import minicpm, oracle
from test_kv_fp8 import ENGINE, fp8_oracle, greedy, prompts_of


def _calibrated(path, **kw):
    return LLM(path, **dict(ENGINE, kv_cache_scales="head", **kw))


# MiniCPM4: prompts on both sides of the LongRoPE boundary (64 tokens), and one that decodes across it.
MINICPM_PROMPTS = prompts_of(3, seed=5, max_len=40) + [prompts_of(1, seed=6, max_len=1)[0] * 58, list(range(3, 83))]


@pytest.fixture(scope="module")
def minicpm_checkpoint(tmp_path_factory):
    """(MiniCPM4 checkpoint, its Llama oracle checkpoint, the eager engine's tokens and scales)."""
    root = tmp_path_factory.mktemp("minicpm")
    path = build_minicpm_checkpoint(root / "minicpm")
    llama = str(minicpm.to_llama(path, root / "llama"))
    llm = _calibrated(path, enforce_eager=True)
    return path, llama, greedy(llm, MINICPM_PROMPTS, 10), oracle.engine_kv_scales(llm)


def test_minicpm4_eager_matches_the_rounding_oracle(minicpm_checkpoint):
    path, llama, eager, scales = minicpm_checkpoint
    assert eager == fp8_oracle(llama, MINICPM_PROMPTS, 10, scales)
    assert eager != hf_greedy(llama, MINICPM_PROMPTS, 10)  # the rounding shows in the tokens


@pytest.mark.slow
def test_minicpm4_graph_mode_equals_eager(minicpm_checkpoint):
    path, _, eager, scales = minicpm_checkpoint
    llm = _calibrated(path)
    assert llm.engine.runner.mode == "graph"
    assert all(torch.equal(a, b) for pair, other in zip(oracle.engine_kv_scales(llm), scales)
               for a, b in zip(pair, other))
    with torch.compiler.set_stance("fail_on_recompile"):
        assert greedy(llm, MINICPM_PROMPTS, 10) == eager


def test_qwen2_moe_shared_expert_matches_the_rounding_oracle(tmp_path):
    path = build_checkpoint(tmp_path, "qwen2_moe", std=0.3)
    llm = _calibrated(path, enforce_eager=True)
    prompts = prompts_of(4, seed=8, max_len=40)
    got = greedy(llm, prompts, 12)
    assert got == fp8_oracle(path, prompts, 12, oracle.engine_kv_scales(llm))
    assert got != hf_greedy(path, prompts, 12)
