"""Parity with transformers on the GPU, for every model family: tiny random checkpoints (tests/conftest.py) in
float32 token-identical to transformers' greedy generate in eager and in graph mode (so graph == eager), and in
bfloat16 under the logprob-margin rule (``nanovllm.tools.oracle.compare``: a divergence only where transformers'
two top candidates lie within 0.1); then bench.py's first 8 prompts on its Qwen3-0.6B in bf16 graph mode, with
bench's engine settings (256 sequences, the default buckets, max_model_len 4096: it shares that run's compile
cache)."""
import pytest

from conftest import build_checkpoint, build_minicpm_checkpoint

FAMILIES = ["qwen3", "qwen2", "llama", "llama3", "qwen3_moe", "mixtral", "qwen2_moe", "minicpm", "qwen3_next",
            "qwen3_5", "qwen3_5_moe", "gemma3", "gpt_oss", "gemma4"]
ENGINE = dict(kvcache_block_size=16, graph_batch_sizes=[8], max_model_len=512, max_num_seqs=8,
              num_kvcache_blocks=256)


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "minicpm":
        return build_minicpm_checkpoint(path)
    if request.param == "gemma4":  # its own tiny config: per-layer inputs, wider full heads, K as V
        from test_gemma4 import build
        return build(path)
    return build_checkpoint(path, request.param)


def failures(verdicts: list[dict], allowed: set[str]) -> list[dict]:
    return [v for v in verdicts if v["status"] not in allowed]


# MiniCPM's tiny config has LongRoPE long factors that a sequence reaches (original_max_position_embeddings 64 <
# max_model_len): in graph mode on CUDA its first tokens differ from transformers (eager mode and the CPU match);
# found by this suite, already so at abb1673, not yet fixed.  MiniCPM4-0.5B's own config has no such switch.
# Qwen3.5-MoE in bfloat16, eager: one prompt leaves transformers at position 20 where transformers' top three tokens
# lie within 0.26 (its top two within 0.07), past the 0.1 margin.  The steps' make-up decides it: the code before
# hybrid snapshots moved to 64-token boundaries diverges alike once its chunk cuts are gone (state_snapshots=0), 100
# tokens a step gives two such prompts and 256 none; graph mode stays within the margin in all of them.
KNOWN = {("minicpm", False, None): "MiniCPM with a reachable LongRoPE switch diverges in graph mode on CUDA",
         ("qwen3_5_moe", True, "bfloat16"): "Qwen3.5-MoE bf16 eager: one prompt past the margin, set by step make-up"}
# bfloat16 holds for the hybrid and Qwen MoE families because the engine rounds where transformers rounds: the
# convolution (tests/test_hybrid_bf16.py) and Qwen3.5-MoE's weighted expert outputs (``fused_moe(round_weights)``);
# their zero-centred norm weights are drawn near 0 (tests/conftest.py).


def expect_known_failure(request, checkpoint: str, eager: bool, dtype: str) -> None:
    family = request.node.callspec.params["checkpoint"]
    for key in ((family, eager, None), (family, eager, dtype)):
        if key in KNOWN:
            request.applymarker(pytest.mark.xfail(strict=True, reason=KNOWN[key]))


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graph"])
def test_float32_is_token_identical_to_transformers(request, checkpoint, eager):
    expect_known_failure(request, checkpoint, eager, "float32")
    from nanovllm.tools import oracle
    verdicts = oracle.run(checkpoint, "float32", "cuda", 8, 24, 0.1, enforce_eager=eager, **ENGINE)
    assert failures(verdicts, {"identical"}) == []


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graph"])
def test_bfloat16_diverges_only_at_near_ties(request, checkpoint, eager):
    expect_known_failure(request, checkpoint, eager, "bfloat16")
    from nanovllm.tools import oracle
    verdicts = oracle.run(checkpoint, "bfloat16", "cuda", 8, 24, 0.1, enforce_eager=eager, **ENGINE)
    assert failures(verdicts, {"identical", "near-tie"}) == []


def test_bench_prompts_on_bench_settings_diverge_only_at_near_ties():
    import gc

    import torch

    from benchmarks.common import default_model, workload
    from nanovllm.tools import oracle
    gc.collect()  # the KV cache is sized from free memory: the tiny engines before must have let go of theirs
    torch.cuda.empty_cache()
    prompts = workload(8, 1024, 1024)[0]
    verdicts = oracle.run(default_model(), "bfloat16", "cuda", 8, 32, 0.1, prompts=prompts, max_num_seqs=256,
                          max_model_len=4096)
    assert failures(verdicts, {"identical", "near-tie"}) == []
