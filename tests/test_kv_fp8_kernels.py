"""The FP8 KV cache's kernels (store, fused rope + store, decode and prefill attention) against their PyTorch twins,
on CPU under the Triton interpreter, and the twins against the number format of ``kernels/kv_quant.py``.

The interpreter flushes e4m3 subnormals (|x / scale| < 2^-6) to zero where torch and the GPU keep them, so stored
values are compared exactly except there; attention is compared within the bf16/fp32 tolerances of the other
kernel tests.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from nanovllm.kernels import kv_quant  # noqa: E402
from nanovllm.kernels import reference as ref  # noqa: E402
from nanovllm.kernels import triton_attention as ta  # noqa: E402
from nanovllm.kernels.triton_rope_store import rope_store_kv_triton  # noqa: E402
from nanovllm.layers.rotary import RotaryEmbedding  # noqa: E402
from test_attention_kernels import make_cache  # noqa: E402

F32, BF16, FP8 = torch.float32, torch.bfloat16, kv_quant.FP8_DTYPE
SUBNORMAL = 2.0 ** -6


def assert_stored_equal(got, want):
    """e4m3 caches equal, except where the true value is subnormal (flushed by the interpreter only)."""
    got, want = got.float(), want.float()
    differ = got != want
    tiny = want.abs() < SUBNORMAL * 1.0001
    assert not (differ & ~tiny).any(), f"{int((differ & ~tiny).sum())} stored elements differ"
    assert (want != 0).sum() > 64, "the case stores something"


def test_quantize_rounds_to_nearest_e4m3_and_saturates():
    scale = torch.tensor([0.5, 2.0])
    x = torch.tensor([[[1.0, 1.05, 1.0625 * 0.5 + 1e-6, 1000.0]], [[-3.0, 1.0, 0.03, -5000.0]]]).transpose(0, 1)
    q = kv_quant.quantize(x, scale).float()  # x / scale, then the nearest of e4m3's 8 steps per octave
    assert q[0, 0].tolist() == [2.0, 2.0, 1.125, 448.0]  # 1.0625 + eps: just past a tie
    assert q[0, 1].tolist() == [-1.5, 0.5, 0.015625, -448.0]
    assert torch.equal(kv_quant.round_trip(x, scale), q * scale[:, None])


@pytest.mark.parametrize("model_dtype", [F32, BF16])
def test_store_kernel_matches_twin(model_dtype):
    g = torch.Generator().manual_seed(0)
    num_blocks, heads, block_size, head_dim = 5, 3, 16, 32
    key, value = ((torch.randn(9, heads, head_dim, generator=g) * 3).to(model_dtype) for _ in range(2))
    key[0, 0, 0] = 5000.0  # saturates
    scales = (torch.tensor([0.5, 1.0, 0.02]), torch.tensor([2.0, 0.1, 1.0]))
    slots = torch.tensor([3, 17, -1, 40, 0, 63, 64, -1, 79], dtype=torch.int32)
    caches = {name: [torch.zeros(num_blocks, heads, block_size, head_dim, dtype=FP8) for _ in range(2)]
              for name in ("got", "want")}
    ta.store_kv_triton(key, value, *caches["got"], slots, *scales)
    ref.store_kv_reference(key, value, *caches["want"], slots, *scales)
    for got, want in zip(caches["got"], caches["want"]):
        assert_stored_equal(got, want)
    assert caches["got"][0].float().abs().max() == 448.0


@pytest.mark.parametrize("qk_norm", [True, False])
def test_fused_rope_store_kernel_matches_twin(qk_norm):
    g = torch.Generator().manual_seed(1)
    heads, kv_heads, head_dim = 4, 2, 32
    qkv = (torch.randn(7, (heads + 2 * kv_heads) * head_dim, generator=g) * 2).to(BF16)
    rotary = RotaryEmbedding(head_dim, 64, 10000.0)
    weights = [(torch.rand(head_dim, generator=g) + 0.5).to(BF16) for _ in range(2)] if qk_norm else [None, None]
    slots = torch.tensor([3, 0, -1, 9, 22, 17, -1])
    scales = (torch.tensor([0.05, 0.3]), torch.tensor([0.02, 0.5]))
    args = (qkv, torch.tensor([0, 1, 5, 9, 30, 31, 2]), rotary.cos_cache, rotary.sin_cache, *weights, 1e-6)
    got = [torch.zeros(6, kv_heads, 4, head_dim, dtype=FP8) for _ in range(2)]
    want = [torch.zeros_like(c) for c in got]
    got_q = rope_store_kv_triton(*args, *got, slots, heads, kv_heads, *scales)
    want_q = ref.rope_store_kv_reference(*args, *want, slots, heads, kv_heads, *scales)
    tol = dict(rtol=2 ** -7, atol=1e-6) if qk_norm else dict(rtol=0, atol=0)
    torch.testing.assert_close(got_q, want_q, **tol)
    if qk_norm:  # a one-ulp bf16 difference before rounding may land on the other side of an e4m3 step
        for g_, w_ in zip(got, want):
            torch.testing.assert_close(g_.float(), w_.float(), rtol=0.13, atol=SUBNORMAL)
    else:
        for g_, w_ in zip(got, want):
            assert_stored_equal(g_, w_)


def fp8_cache(ctx_lens, num_kv_heads, head_dim, block_size, seed):
    """``make_cache``'s cache as FP8 (values x 20, saturated) with per-head scales, and its dequantised float32
    copy."""
    k, v, tables, lens = make_cache(ctx_lens, num_kv_heads, head_dim, block_size, torch.float32, seed=seed)
    g = torch.Generator().manual_seed(seed)
    scales = [torch.rand(num_kv_heads, generator=g) * 0.1 + 0.01 for _ in range(2)]
    caches = [(c * 20).clamp(-448, 448).to(FP8) for c in (k, v)]
    plain = [kv_quant.dequantize(c, s) for c, s in zip(caches, scales)]
    return caches, scales, plain, tables, lens


def test_twin_attends_over_the_dequantised_cache():
    # The twin's FP8 attention is its float32 attention over stored * scale, exactly.
    caches, scales, plain, tables, lens = fp8_cache([5, 40, 0, 17], 2, 32, 16, seed=2)
    q = torch.randn(4, 4, 32)
    got = ref.decode_attention_reference(q, *caches, tables, lens, 0.2, *scales)
    want = ref.decode_attention_reference(q, *plain, tables, lens, 0.2)
    assert torch.equal(got, want)
    cu = torch.tensor([0, 3, 10, 10, 17], dtype=torch.int32)
    qp = torch.randn(17, 4, 32)
    got = ref.prefill_attention_reference(qp, *caches, cu, lens, tables, 0.2, *scales)
    assert torch.equal(got, ref.prefill_attention_reference(qp, *plain, cu, lens, tables, 0.2))


def rel_err(out, want):
    return ((out.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.parametrize("dtype,splits", [(F32, 1), (BF16, 1), (BF16, 3)])
def test_decode_kernel_matches_twin(dtype, splits):
    caches, scales, _, tables, lens = fp8_cache([1, 70, 0, 33], 2, 64, 16, seed=3)
    q = torch.randn(4, 8, 64).to(dtype)
    want = ref.decode_attention_reference(q, *caches, tables, lens, 0.125, *scales)
    got = ta.decode_attention_configured(q, *caches, tables, lens, 0.125, *scales, num_splits=splits)
    assert torch.isfinite(got).all() and torch.equal(got[2], torch.zeros_like(got[2]))
    assert rel_err(got, want) < (1e-3 if dtype == F32 else 2e-2)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_prefill_kernel_matches_twin(dtype):
    q_lens, prefix = [37, 1, 20], [0, 40, 12]
    ctx = [a + b for a, b in zip(q_lens, prefix)]
    caches, scales, _, tables, lens = fp8_cache(ctx, 2, 64, 16, seed=4)
    cu = torch.tensor([0, 37, 38, 58], dtype=torch.int32)
    q = torch.randn(58, 4, 64).to(dtype)
    want = ref.prefill_attention_reference(q, *caches, cu, lens, tables, 0.125, *scales)
    got = ta.prefill_attention_configured(q, *caches, cu, lens, tables, 0.125, *scales, block_m=16, block_n=32)
    assert torch.isfinite(got).all()
    assert rel_err(got, want) < (1e-3 if dtype == F32 else 2e-2)
