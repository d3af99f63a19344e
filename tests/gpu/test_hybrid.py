"""Hybrid linear-attention models on the GPU: the Triton linear-attention kernels against their twins at the
published models' head shapes (prefill with and without states, decode), and prefix-cache hits in graph mode giving
transformers' float32 tokens (the parity of the three families is ``test_parity.py``'s)."""
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
