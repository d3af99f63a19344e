"""Hybrid linear-attention models on the GPU: the Triton linear-attention kernels against their twins at the
published models' head shapes (prefill with and without states, decode, a verify step's chains), and in graph mode
prefix-cache hits, n-gram speculation and an FP8 KV cache giving transformers' float32 tokens (the FP8 cache's with
K and V rounded alike; the parity of the three families is ``test_parity.py``'s)."""
import pytest
import torch

from conftest import build_checkpoint, hf_greedy
from gpu.conftest import skip_reason

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")]


@pytest.mark.parametrize("q_lens, prior", [([300, 1, 77, 1], [0, 40, 512, 9]), ([1] * 64, list(range(64)))],
                         ids=["prefill", "decode"])
def test_kernels_match_their_twins_at_model_shapes(q_lens, prior):
    from nanovllm.kernels.linear_attention import reference as ref
    from nanovllm.kernels.linear_attention import triton_kernels as tk
    HK, HV, DK, DV, K = 16, 32, 128, 128, 4
    D = 2 * HK * DK + HV * DV
    dev = torch.device("cuda")
    cu = torch.tensor([0] + q_lens, device=dev).cumsum(0).to(torch.int32)
    context = (torch.tensor(q_lens) + torch.tensor(prior)).to(torch.int32).to(dev)
    order = torch.randperm(len(q_lens) + 3, device=dev)
    slots, spare = order[:len(q_lens)], order[len(q_lens):]
    # a prefill's first row snapshots its first 256 tokens into a spare slot (the others: none, into another)
    capture_slots = torch.full((len(q_lens),), int(spare[1]), device=dev)
    capture_lens = torch.zeros(len(q_lens), dtype=torch.int64, device=dev)
    if q_lens[0] > 256:
        capture_slots[0], capture_lens[0] = spare[0], 256
    T = int(cu[-1])
    x, w = torch.randn(T, D, device=dev, dtype=torch.bfloat16), torch.randn(D, K, device=dev, dtype=torch.bfloat16)
    q, k = (torch.randn(T, HK, DK, device=dev, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(T, HV, DV, device=dev, dtype=torch.bfloat16)
    g, beta = -torch.rand(T, HV, device=dev), torch.rand(T, HV, device=dev)
    conv0 = torch.randn(len(q_lens) + 3, D, K - 1, device=dev, dtype=torch.bfloat16)
    ssm0 = torch.randn(len(q_lens) + 3, HV, DK, DV, device=dev) * 0.1
    results = []
    for conv_fn, rule_fn in ((ref.causal_conv1d_reference, ref.gated_delta_rule_reference),
                             (tk.causal_conv1d_triton, tk.gated_delta_rule_triton)):
        conv, ssm = conv0.clone(), ssm0.clone()
        captures = (capture_slots, capture_lens)
        results.append((conv_fn(x, w, conv, slots, cu, context, *captures),
                        rule_fn(q, k, v, g, beta, ssm, slots, cu, context, *captures), conv, ssm))
    for want, got in zip(*results):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


def test_prefix_hits_in_graph_mode_give_transformers_tokens(tmp_path):
    from nanovllm import LLM, SamplingParams
    path = build_checkpoint(tmp_path, "qwen3_5")
    system = list(range(100, 180))
    prompts = [system + [5, 6], system + [7, 8, 9], system + [10] * 30, system + [5, 6]]
    want = hf_greedy(path, prompts, 8)
    llm = LLM(path, kvcache_block_size=16, graph_batch_sizes=[1, 2, 4], max_num_seqs=4, max_model_len=256,
              num_kvcache_blocks=64, dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    got = [llm.generate([p], params, use_tqdm=False)[0]["token_ids"] for p in prompts]
    assert got == want
    assert llm.engine.block_manager.cache_hit_tokens >= 64 + 80  # the third (system) and the fourth (whole)


def test_chained_kernels_match_their_twins_at_model_shapes():
    """A verify step's chains (``kernels/linear_attention/ops.py``): 24 sequences of 4 rows and 8 rows alone, in bf16
    at Qwen3.5's head shapes; outputs and the state each row keeps in its own slot."""
    from nanovllm.kernels.linear_attention import reference as ref
    from nanovllm.kernels.linear_attention import triton_kernels as tk
    HK, HV, DK, DV, K = 16, 32, 128, 128, 4
    D = 2 * HK * DK + HV * DV
    dev = torch.device("cuda")
    chain = torch.tensor([4, 0, 0, 0] * 24 + [1] * 8, device=dev)
    rows = chain.shape[0]
    cu = torch.arange(rows + 1, device=dev, dtype=torch.int32)
    context = (torch.arange(rows, device=dev) % 4 + 30).to(torch.int32)
    slots = torch.randperm(rows + 4, device=dev)[:rows]
    none = (torch.full((rows,), rows, device=dev), torch.zeros(rows, dtype=torch.int64, device=dev))
    x, w = torch.randn(rows, D, device=dev, dtype=torch.bfloat16), torch.randn(D, K, device=dev, dtype=torch.bfloat16)
    q, k = (torch.randn(rows, HK, DK, device=dev, dtype=torch.bfloat16) for _ in range(2))
    v = torch.randn(rows, HV, DV, device=dev, dtype=torch.bfloat16)
    g, beta = -torch.rand(rows, HV, device=dev), torch.rand(rows, HV, device=dev)
    conv0 = torch.randn(rows + 4, D, K - 1, device=dev, dtype=torch.bfloat16)
    ssm0 = torch.randn(rows + 4, HV, DK, DV, device=dev) * 0.1
    results = []
    for conv_fn, rule_fn in ((ref.causal_conv1d_reference, ref.gated_delta_rule_reference),
                             (tk.causal_conv1d_triton, tk.gated_delta_rule_triton)):
        conv, ssm = conv0.clone(), ssm0.clone()
        results.append((conv_fn(x, w, conv, slots, cu, context, *none, chain, 4),
                        rule_fn(q, k, v, g, beta, ssm, slots, cu, context, *none, chain, 4), conv, ssm))
    for want, got in zip(*results):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("option", ["speculation", "fp8_kv"])
def test_speculation_and_an_fp8_kv_cache_in_graph_mode(tmp_path, option):
    """float32, graph mode: n-gram speculation (verify steps chaining each sequence's rows, split in parts of 4 rows)
    gives transformers' tokens; an FP8 KV cache gives those of transformers with K and V rounded alike."""
    from nanovllm import LLM, SamplingParams
    from nanovllm.tools import oracle
    path = build_checkpoint(tmp_path, "qwen3_5")
    base = list(range(40, 64))
    prompts = [base + base[:12], base * 3, [5, 9, 33] * 10, list(range(100, 140))]
    extra = {"speculative_config": {"method": "ngram", "num_speculative_tokens": 3}} if option == "speculation" \
        else {"kv_cache_dtype": "fp8"}
    llm = LLM(path, kvcache_block_size=16, graph_batch_sizes=[4], max_num_seqs=4, max_model_len=256,
              num_kvcache_blocks=64, dtype="float32", **extra)
    scales = oracle.engine_kv_scales(llm)
    want = hf_greedy(path, prompts, 24, **({} if scales is None else
                                            {"attn_implementation": oracle.fp8_kv_attention(scales)}))
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    assert [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)] == want
    if option == "speculation":
        assert llm.engine.stats["spec_verify_steps"] > 0
