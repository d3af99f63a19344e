"""The fused MoE (``nanovllm::fused_moe``): its pure-PyTorch twin against a naive per-expert oracle, and the Triton
routing, layout and grouped GEMMs against the twin, on CPU under the Triton interpreter (tiny shapes: it is
slow).  Cases: random routing, every token on one expert, experts that get no token, top-k equal to the number
of experts, padded rows (zero inputs, tied logits), a row of NaN logits, several routing chunks, dims that are
not tile multiples; the down GEMM on tiles of its own (``MoeConfig.down``).

The GPU check and timing at Qwen3-30B-A3B's and Mixtral's shapes is benchmarks/moe_kernel.py.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from nanovllm.kernels import moe_configs  # noqa: E402
from nanovllm.kernels import moe_reference as ref  # noqa: E402
from nanovllm.kernels.moe_configs import MoeConfig  # noqa: E402
from nanovllm.kernels.triton_moe import fused_moe_triton  # noqa: E402
from nanovllm.kernels import triton_moe_align as align_module  # noqa: E402
from nanovllm.kernels.triton_moe_align import align_triton, chunk_scan, route_triton  # noqa: E402

GROUPED = MoeConfig(16, 32, 32)


def naive_moe(x, logits, w13, w2, top_k, renormalize):
    """Float64, expert by expert over the tokens that chose it (transformers' loop)."""
    probs = torch.softmax(logits.double(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros(x.shape, dtype=torch.float64)
    for e in range(w13.shape[0]):
        token, k = torch.where(ids == e)
        gate, up = F.linear(x[token].double(), w13[e].double()).chunk(2, dim=-1)
        out.index_add_(0, token, F.linear(F.silu(gate) * up, w2[e].double()) * weights[token, k, None])
    return out


def make_case(num_tokens, num_experts, hidden=80, inter=48, seed=0, favour=None):
    """x, router logits, w13, w2; ``favour``: an expert every token prefers by far (not a tie)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen)
    logits = torch.randn(num_tokens, num_experts, generator=gen)
    if favour is not None:
        logits[:, favour] += 20.0
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden ** 0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter ** 0.5
    return x, logits, w13, w2


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("renormalize", [True, False])
def test_twin_matches_the_naive_oracle_in_one_chunk_or_many(renormalize, monkeypatch):
    x, logits, w13, w2 = make_case(7, 6)
    want = naive_moe(x, logits, w13, w2, 2, renormalize)
    got = ref.fused_moe_reference(x, logits, w13, w2, 2, renormalize)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    monkeypatch.setattr(ref, "_CHUNK_ELEMENTS", 1)  # one pair per chunk
    torch.testing.assert_close(ref.fused_moe_reference(x, logits, w13, w2, 2, renormalize), got, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("num_tokens,top_k,num_experts", [(1, 2, 8), (70, 2, 8), (5, 3, 3), (9, 1, 16)])
def test_triton_routing_matches_the_twin_over_one_or_several_chunks(num_tokens, top_k, num_experts):
    _, logits, _, _ = make_case(num_tokens, num_experts, seed=num_tokens)
    for renormalize in (True, False):
        weights, ids, hist = route_triton(logits, top_k, renormalize)
        want_w, want_ids = ref.route_reference(logits, top_k, renormalize)
        assert torch.equal(ids.long(), want_ids)
        torch.testing.assert_close(weights, want_w, rtol=1e-5, atol=1e-7)
        assert torch.equal(hist.sum(0), torch.bincount(want_ids.flatten(), minlength=num_experts).int())


@pytest.mark.parametrize("ids", [
    [[2, 0], [2, 2], [0, 2]],  # the docstring's example, three experts
    [[1], [1], [1], [1], [1], [1], [1], [1]],  # one expert, exactly half a block
    [[3, 1, 0, 2]] * 5,  # top-k == E: every expert, 5 pairs each
])
def test_triton_layout_matches_the_reference_layout(ids):
    ids = torch.tensor(ids, dtype=torch.int32)
    num_experts = int(ids.max()) + 1
    hist = torch.bincount(ids.flatten().long(), minlength=num_experts).int()[None]  # one routing chunk
    for block_m in (4, 16):
        got = align_triton(ids, hist, num_experts, block_m)
        want = ref.align_reference(ids, num_experts, block_m)
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])  # block experts and rows
        valid = want[0] >= 0
        assert torch.equal(got[0][valid], want[0][valid])
        assert sorted(want[0][valid].tolist()) == list(range(ids.numel()))


@pytest.mark.parametrize("inline_up_to", [align_module.INLINE_SCAN_CHUNKS, 2, 0])
def test_layout_over_several_routing_chunks_keeps_pair_order_inside_each_expert(monkeypatch, inline_up_to):
    """Three chunks, the histogram summed in the align programs (the default: up to 32 chunks) or by chunk_scan."""
    monkeypatch.setattr(align_module, "INLINE_SCAN_CHUNKS", inline_up_to)
    scans = []
    monkeypatch.setattr(align_module, "chunk_scan", lambda hist: scans.append(1) or hist.cumsum(0, dtype=torch.int32))
    _, logits, _, _ = make_case(150, 5, seed=3)  # top-2: 64 tokens per chunk, three chunks
    _, ids, hist = route_triton(logits, 2, True)
    assert hist.shape == (3, 5)
    got = align_triton(ids, hist, 5, 16)
    assert len(scans) == (0 if inline_up_to >= 3 else 1)
    want = ref.align_reference(ids, 5, 16)
    valid = want[0] >= 0
    assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
    assert torch.equal(got[0][valid], want[0][valid])


@pytest.mark.parametrize("num_tokens,top_k,num_experts", [(16, 8, 128), (100, 8, 128), (20, 10, 512)])
def test_layout_of_many_experts_ranks_pairs_by_comparing_them(num_tokens, top_k, num_experts):
    """As many experts as a chunk's pairs or more (Qwen3-30B-A3B's 128, Qwen3-Next's 512): the other rank path,
    over one chunk and several."""
    _, logits, _, _ = make_case(num_tokens, num_experts, seed=num_tokens)
    _, ids, hist = route_triton(logits, top_k, True)
    for block_m in (8, 32):
        got = align_triton(ids, hist, num_experts, block_m)
        want = ref.align_reference(ids, num_experts, block_m)
        valid = want[0] >= 0
        assert torch.equal(got[1], want[1]) and torch.equal(got[2], want[2])
        assert torch.equal(got[0][valid], want[0][valid])


@pytest.mark.parametrize("chunks,num_experts", [(1, 8), (70, 20), (130, 128)])
def test_the_chunk_scan_is_torchs_cumsum(chunks, num_experts):
    """One chunk; chunks and experts that leave partial tiles (64 chunks, 16 experts a tile); several tiles of both."""
    hist = torch.randint(0, 9, (chunks, num_experts), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(chunk_scan(hist), hist.cumsum(0, dtype=torch.int32))


CASES = {
    "random": dict(num_tokens=5, num_experts=8, top_k=2),
    "one_expert_for_all": dict(num_tokens=20, num_experts=8, top_k=1, favour=3),
    "empty_experts": dict(num_tokens=3, num_experts=16, top_k=1),
    "top_k_is_e": dict(num_tokens=6, num_experts=4, top_k=4),
    "many_blocks": dict(num_tokens=33, num_experts=4, top_k=2),
}


OWN_DOWN = MoeConfig(16, 32, 32, down=MoeConfig(16, 64, 16, num_warps=2, swap=True))  # the down GEMM's own tiles


@pytest.mark.parametrize("cfg", [GROUPED, OWN_DOWN], ids=["shared_tiles", "own_down_tiles"])
@pytest.mark.parametrize("case", CASES)
def test_triton_moe_matches_the_twin(case, cfg):
    kw = dict(CASES[case])
    top_k = kw.pop("top_k")
    x, logits, w13, w2 = make_case(**kw)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        args = (x.to(dtype), logits.to(dtype), w13.to(dtype), w2.to(dtype), top_k, True)
        got = fused_moe_triton(*args, cfg=cfg)
        want = ref.fused_moe_reference(*args)
        assert got.dtype == dtype and got.shape == x.shape
        assert rel_err(got, want) < tol, f"{dtype}: relative error {rel_err(got, want):.2e}"


def test_padded_rows_give_zeros_and_leave_real_rows_alone(cfg=GROUPED):
    """Bucket padding: zero inputs with all-equal logits (every expert ties) beside real rows."""
    x, logits, w13, w2 = make_case(6, 8)
    x[3:], logits[3:] = 0.0, 0.0
    got = fused_moe_triton(x, logits, w13, w2, 2, False, cfg=cfg)
    assert torch.equal(got[3:], torch.zeros_like(got[3:]))
    real = ref.fused_moe_reference(x[:3], logits[:3], w13, w2, 2, False)
    assert rel_err(got[:3], real) < 1e-5


def test_a_row_of_nan_logits_spoils_only_its_own_output(cfg=GROUPED):
    """Its ids stay valid experts: out of range, the grouped layout put its pair on another row's slot."""
    x, logits, w13, w2 = make_case(6, 8)
    logits[2] = float("nan")
    _, ids, hist = route_triton(logits, 2, True)
    assert int(ids.min()) >= 0 and int(ids.max()) < 8 and int(hist.sum()) == ids.numel()
    got = fused_moe_triton(x, logits, w13, w2, 2, True, cfg=cfg)
    rest = torch.tensor([0, 1, 3, 4, 5])
    assert rel_err(got[rest], ref.fused_moe_reference(x[rest], logits[rest], w13, w2, 2, True)) < 1e-5


def test_dispatch_by_rows_per_expert():
    # Qwen3-30B-A3B (top-8 of 128) and Mixtral (top-2 of 8) at the sizes benchmarks/moe_kernel.py timed
    picks = {(t, k, e): moe_configs.choose(t, k, e).block_m
             for t in (1, 16, 64, 256, 1024, 4096) for k, e in ((8, 128), (2, 8))}
    assert picks[(256, 8, 128)] == 16 and picks[(1024, 8, 128)] == 64 and picks[(16, 2, 8)] == 16
    assert picks[(256, 2, 8)] == 64 and moe_configs.choose(4096, 8, 128).block_n == 128
    for k, e in ((8, 128), (2, 8)):  # more rows per expert never takes smaller blocks
        blocks = [picks[(t, k, e)] for t in (1, 16, 64, 256, 1024, 4096)]
        assert blocks == sorted(blocks)


def test_round_weights_matches_the_twin_in_bf16_and_changes_nothing_in_float32(cfg=GROUPED):
    """``round_weights`` (the Qwen MoE families): weights and weighted outputs rounded to x's dtype before the sum;
    float32 results stay exactly as they were."""
    x, logits, w13, w2 = make_case(33, 4)
    args = (x, logits, w13, w2, 2, True)
    assert torch.equal(fused_moe_triton(*args, cfg=cfg, round_weights=True), fused_moe_triton(*args, cfg=cfg))
    assert torch.equal(ref.fused_moe_reference(*args, round_weights=True), ref.fused_moe_reference(*args))
    bf16 = tuple(t.bfloat16() for t in args[:4]) + args[4:]
    got = fused_moe_triton(*bf16, cfg=cfg, round_weights=True)
    want = ref.fused_moe_reference(*bf16, round_weights=True)
    assert got.dtype == torch.bfloat16 and rel_err(got, want) < 2e-2
