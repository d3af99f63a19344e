"""W8A8 FP8 experts: the activation rounding (``kernels/act_quant.py``) on hand-made values, its Triton twin
bit-exact, the W8A8 kernels (``triton_moe_w8a8.py``) against the twin (``moe_reference.py``) under the Triton
interpreter at one token, a partial block and experts that get no token, with one weight scale per row and with
128-column groups, the oracle (``quant/w8a8_oracle.py``) against a hand-computed expert, a Qwen3-MoE with FP8 experts
against transformers running that oracle, eager and graph, and at two ranks, and ``synthesize --quantize fp8``
of an MoE."""
import json
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from conftest import build_checkpoint, hf_greedy  # noqa: E402
from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.kernels import act_quant, weight_quant  # noqa: E402
from nanovllm.kernels import moe_reference as ref  # noqa: E402
from nanovllm.kernels.moe_configs import MoeConfig  # noqa: E402
from nanovllm.kernels.options import KernelOptions, current_options, set_options  # noqa: E402
from nanovllm.kernels.triton_moe import fused_moe_triton, moe_experts_triton  # noqa: E402
from nanovllm.kernels.triton_moe_w8a8 import quantize_rows  # noqa: E402
from nanovllm.quant import fp8_oracle  # noqa: E402
from nanovllm.quant.w8a8_oracle import engine_w8a8, w8a8_forward  # noqa: E402

EXPERTS, TOP_K = 8, 2
SHAPES = {"one_scale_per_row": (80, 48, 80), "groups_of_128": (256, 192, 128)}  # hidden, inter, weight group


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def test_the_rounding_rule_on_hand_made_values():
    x = torch.zeros(1, 130)
    x[0, 0], x[0, 1], x[0, 2] = 896.0, -3.0, 1.0  # group 0: amax 896, scale 2; 1.0 / 2 = 0.5 exactly
    x[0, 128], x[0, 129] = 0.0, 0.0  # group 1 (two columns): all zero
    q, scale = act_quant.quantize(x)
    assert scale.tolist() == [[2.0, 1.0]]
    assert q.float()[0, :3].tolist() == [448.0, -1.5, 0.5] and q.float()[0, 128:].tolist() == [0.0, 0.0]
    y = torch.tensor([[1.0, 0.0123]])  # scale 1 / 448: 0.0123 * 448 = 5.51 rounds to 5.5 (e4m3 steps 0.5 there)
    assert act_quant.quantize(y)[0].float()[0, 1].item() == 5.5
    assert torch.equal(act_quant.dequantized(y)[0, 0], torch.tensor(1.0))


def test_quantize_rows_kernel_equals_the_rule_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    # 21 rows: a whole tile of 16 (QUANTIZE_ROWS) and a partial one
    x = torch.randn(21, 300, generator=gen).sign() * (0.5 + torch.rand(21, 300, generator=gen)) \
        * torch.logspace(-2, 2, 300)  # within a group no value is below 2^-6 of its scale: no e4m3 subnormals
    x[3] = 0.0
    x[18] = 0.0
    q, s = quantize_rows(x)
    want_q, want_s = act_quant.quantize(x)
    assert torch.equal(s, want_s) and torch.equal(q.view(torch.uint8), want_q.view(torch.uint8))


def experts(hidden, inter, group, seed):
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(EXPERTS, 2 * inter, hidden, generator=gen) * torch.logspace(-1, 1, hidden) / hidden ** 0.5
    w2 = torch.randn(EXPERTS, hidden, inter, generator=gen) / inter ** 0.5
    return (*weight_quant.quantize(w13, group), *weight_quant.quantize(w2, group))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_tokens", [1, 7, 40])  # 1: six of eight experts get no token; 7: partial blocks
@pytest.mark.parametrize("cfg", [MoeConfig(16, 64, 128), MoeConfig(64, 128, 128),
                                 MoeConfig(32, 128, 128, down=MoeConfig(32, 64, 128, num_stages=4, swap=False))],
                         ids=["swapped", "plain", "own_down_tiles"])
def test_w8a8_kernels_match_the_twin(shape, num_tokens, cfg):
    hidden, inter, group = SHAPES[shape]
    w13, s13, w2, s2 = experts(hidden, inter, group, seed=num_tokens)
    gen = torch.Generator().manual_seed(num_tokens)
    x, logits = torch.randn(num_tokens, hidden, generator=gen), torch.randn(num_tokens, EXPERTS, generator=gen)
    assert act_quant.moe_w8a8(w13, s13, None, group)
    for dtype, tolerance in ((torch.float32, 2e-5), (torch.bfloat16, 1e-2)):
        got = fused_moe_triton(x.to(dtype), logits, w13, w2, TOP_K, True, s13, s2, group, cfg=cfg)
        want = ref.fused_moe_reference(x.to(dtype), logits, w13, w2, TOP_K, True, s13, s2, group)
        assert got.dtype == dtype and rel_err(got, want) < tolerance, f"{dtype}: {rel_err(got, want):.2e}"
    weight_only = dict(current_options().as_dict(), moe_w8a8=False)
    saved = current_options()
    set_options(KernelOptions(**weight_only))
    try:  # the switch reaches the twin: weight-only differs from W8A8 by the activation rounding
        assert not act_quant.moe_w8a8(w13, s13, None, group)
        plain = ref.fused_moe_reference(x, logits, w13, w2, TOP_K, True, s13, s2, group)
    finally:
        set_options(saved)
    assert 1e-4 < rel_err(plain, want.float()) < 5e-2


def test_moe_experts_with_a_transposed_w2_in_w8a8():
    """The expert cache's layout: w2 and its scales as transposed views, ids into its slots."""
    hidden, inter, group = SHAPES["groups_of_128"]
    w13, s13, w2, s2 = experts(hidden, inter, group, seed=5)
    w2t, s2t = w2.transpose(1, 2).contiguous().transpose(1, 2), s2.transpose(1, 2).contiguous().transpose(1, 2)
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(5, hidden, generator=gen)
    weights, ids = ref.route_reference(torch.randn(5, EXPERTS, generator=gen), TOP_K, True)
    got = moe_experts_triton(x, weights, ids, w13, w2t, s13, s2t, group)
    assert rel_err(got, ref.experts_reference(x, weights, ids, w13, w2, s13, s2, group)) < 2e-5


def test_the_oracle_rounds_what_a_hand_computed_expert_rounds():
    class Experts(torch.nn.Module):
        num_experts = 2
        act_fn = torch.nn.SiLU()

    module = Experts()
    gen = torch.Generator().manual_seed(3)
    module.gate_up_proj = torch.randn(2, 8, 140, generator=gen)
    module.down_proj = torch.randn(2, 140, 4, generator=gen)
    x = torch.randn(3, 140, generator=gen)
    ids, weights = torch.tensor([[0], [1], [0]]), torch.tensor([[1.0], [0.5], [0.25]])
    got, halves = w8a8_forward(module, x, ids, weights), w8a8_forward(module, x, ids, weights, shards=2)
    for t in range(3):
        e = ids[t, 0].item()
        xq = act_quant.dequantized(x[t:t + 1])
        assert not torch.equal(xq, x[t:t + 1])  # the rounding is not a no-op
        gate, up = (xq @ module.gate_up_proj[e].T).chunk(2, dim=-1)
        h = torch.nn.functional.silu(gate) * up
        torch.testing.assert_close(got[t], (act_quant.dequantized(h) @ module.down_proj[e].T)[0] * weights[t, 0])
        h2 = torch.cat([act_quant.dequantized(h[:, :2]), act_quant.dequantized(h[:, 2:])], dim=-1)  # two ranks
        torch.testing.assert_close(halves[t], (h2 @ module.down_proj[e].T)[0] * weights[t, 0])
    assert not torch.equal(got, halves)


@pytest.mark.slow
def test_qwen3_moe_with_fp8_experts_matches_the_w8a8_oracle_in_eager_and_graph(tmp_path):
    path = build_checkpoint(tmp_path / "plain", "qwen3_moe", hidden_size=256)  # x in two groups of 128
    oracle = fp8_oracle.write_dequantized(path, tmp_path / "oracle", online=torch.float32)
    engine = dict(kvcache_block_size=16, num_kvcache_blocks=24, max_model_len=128, max_num_seqs=4,
                  graph_batch_sizes=[1, 2, 4], quantization="fp8")
    prompts = [[(7 * i + 3 * j) % 380 + 3 for j in range(5 + 4 * i)] for i in range(4)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    want = hf_greedy(oracle, prompts, 10, w8a8=True)
    assert want != hf_greedy(oracle, prompts, 10)  # the rounding shows in the tokens
    for eager in (True, False):
        llm = LLM(path, enforce_eager=eager, **engine)
        assert [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)] == want


@pytest.mark.parametrize("arch, expert, router", [
    ("qwen3_moe", "mlp.experts.7.down_proj", "mlp.gate"),
    ("mixtral", "block_sparse_moe.experts.3.w2", "block_sparse_moe.gate")])
def test_synthesize_streams_a_block_fp8_moe_that_matches_the_w8a8_oracle(tmp_path, arch, expert, router):
    """``synthesize --quantize fp8`` writes stacked experts one per expert under the hub's names (what vLLM loads
    too), the router unquantized and listed so; the engine on it equals transformers on its dequantized weights
    with W8A8 rounding."""
    from safetensors.torch import load_file

    from nanovllm.quant import registry
    from nanovllm.tools import synthesize
    config = build_checkpoint(tmp_path / "src", arch) + "/config.json"
    out = tmp_path / "fp8"
    synthesize.main([config, str(out), "--dtype", "float32", "--quantize", "fp8"])
    weights = load_file(f"{out}/model.safetensors")
    expert = f"model.layers.0.{expert}.weight"
    assert weights[expert].dtype == torch.float8_e4m3fn and expert + "_scale_inv" in weights
    assert not any("gate_up_proj" in name for name in weights)
    assert weights[f"model.layers.0.{router}.weight"].dtype == torch.float32
    quant = json.loads((out / "config.json").read_text())["quantization_config"]
    assert f"model.layers.0.{router}" in quant["modules_to_not_convert"]  # else vLLM quantizes the router
    oracle = registry.write_oracle(str(out), tmp_path / "plain")
    prompts = [[(5 * i + 11 * j) % 380 + 3 for j in range(4 + 3 * i)] for i in range(3)]
    llm = LLM(str(out), enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=24, max_model_len=128,
              max_num_seqs=4)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    got = [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == hf_greedy(oracle, prompts, 8, w8a8=True)
    assert engine_w8a8(llm.engine.runner.model)  # what tools/oracle.py asks before it rounds transformers' experts
    plain = LLM(build_checkpoint(tmp_path / "bf16", arch), enforce_eager=True, num_kvcache_blocks=8,
                max_model_len=64, max_num_seqs=2)
    assert not engine_w8a8(plain.engine.runner.model)


@pytest.mark.slow
def test_two_ranks_round_the_intermediate_of_their_slice(tmp_path):
    """At TP=2 each rank rounds its half of the intermediate's columns in groups of its own: the oracle rounding the
    two halves apart gives its tokens (one GPU rounds the whole 32 columns as one group)."""
    path = build_checkpoint(tmp_path / "plain", "qwen3_moe")
    oracle = fp8_oracle.write_dequantized(path, tmp_path / "oracle", online=torch.float32)
    prompts = [[(13 * i + 5 * j) % 380 + 3 for j in range(6 + 5 * i)] for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    with LLM(path, tensor_parallel_size=2, enforce_eager=True, quantization="fp8", num_kvcache_blocks=24,
             kvcache_block_size=16, max_model_len=128, max_num_seqs=4) as two:
        assert [o["token_ids"] for o in two.generate(prompts, params, use_tqdm=False)] == \
            hf_greedy(oracle, prompts, 10, w8a8=2)
