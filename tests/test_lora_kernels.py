"""The multi-LoRA ops (nanovllm/kernels/lora): the Triton kernels (token blocks, the shrink's K in one split or
several) against the twin on CPU under the Triton interpreter (mixed slots with slot 0 among them, every token on
slot 0, float32, bfloat16 and float16, a rank padded to a power of two and one that is not, K and N not multiples of
the blocks, a strided y, no tokens), the split's policy, the stacked dense path (``stacked.py``) and which path
the CUDA entry (``lora_add_triton``) takes; the expand alone on a shrink made beside the base outputs, and
``lora_linear``'s CUDA entry on both sides of its fold limit (``folded.py``); and the ops' CPU implementations (the
twins).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from nanovllm.kernels.lora import ops as lora_ops  # noqa: E402
from nanovllm.kernels.lora import reference as ref  # noqa: E402
from nanovllm.kernels.lora import folded as folded_path  # noqa: E402
from nanovllm.kernels.lora import stacked  # noqa: E402
from nanovllm.kernels.lora import triton_lora as tl_lora  # noqa: E402


def case(T, K, N, S, R, dtype, slots=None, rank=None, seed=0):
    """y, x, slots, a, b, scaling; ``rank`` < R leaves a's and b's last rows and columns zero (a padded pool)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    a, b = r(S, R, K) / K ** 0.5, r(S, N, R)
    if rank is not None:
        a[:, rank:], b[:, :, rank:] = 0, 0
    a[0], b[0] = 0, 0  # slot 0: no adapter
    if slots is None:
        slots = torch.randint(0, S, (T,), generator=g)
    scaling = torch.rand(S, generator=g) * 2 + 0.25
    return (r(T, N).to(dtype), r(T, K).to(dtype), slots.to(torch.int64), a.to(dtype), b.to(dtype), scaling)


TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=3e-2),
       torch.float16: dict(rtol=1e-3, atol=4e-3)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("R,rank", [(8, 5), (12, None)])
def test_triton_matches_the_twin_on_mixed_slots(dtype, R, rank):
    T, K, N, S = 7, 300, 150, 4  # K past one shrink block, N past one expand block, neither a multiple
    slots = torch.tensor([0, 1, 3, 0, 2, 1, 3])
    args = case(T, K, N, S, R, dtype, slots=slots, rank=rank, seed=R)
    got, want = tl_lora.lora_add_slots(*args), ref.lora_add_reference(*args)
    assert got.dtype == dtype and got.shape == (T, N)
    torch.testing.assert_close(got, want, **TOL[dtype])
    y = args[0]
    assert torch.equal(got[slots == 0], y[slots == 0])  # slot 0 adds nothing
    assert not torch.allclose(got[slots != 0], y[slots != 0])


@pytest.fixture(params=[("one split", "slot axis"), ("several splits", "slot axis"), ("one split", "slot loop"),
                        ("several splits", "slot loop")], ids=" ".join)
def small_blocks(request, monkeypatch):
    """Token blocks of 16 (a slot spans several); the shrink's K in one split or in as many as it has K steps (the
    expand adds them); a program per slot (decode's grid) or one walking its block's slots (prefill's)."""
    monkeypatch.setattr(tl_lora, "BT_MAX", 16)
    monkeypatch.setattr(tl_lora, "BK", 32)
    monkeypatch.setattr(tl_lora, "TARGET_PROGRAMS", 1 if request.param[0] == "one split" else 1024)
    monkeypatch.setattr(tl_lora, "SLOT_AXIS_TOKENS", 10 ** 9 if request.param[1] == "slot axis" else 0)
    return request.param[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("R,rank", [(8, 5), (12, None)])
def test_token_blocks_and_k_splits_match_the_twin(small_blocks, dtype, R, rank):
    T, K, N, S = 45, 70, 50, 4  # slot 1 holds more than one token block; K is three steps, the last partial
    g = torch.Generator().manual_seed(1)
    slots = torch.where(torch.rand(T, generator=g) < 0.5, 1, torch.randint(0, S, (T,), generator=g))
    args = case(T, K, N, S, R, dtype, slots=slots, rank=rank, seed=R)
    assert tl_lora.split_k(T, K, 16)[0] == (1 if small_blocks == "one split" else 3)
    got, want = tl_lora.lora_add_slots(*args), ref.lora_add_reference(*args)
    torch.testing.assert_close(got, want, **TOL[dtype])
    assert torch.equal(got[slots == 0], args[0][slots == 0])


def test_the_split_covers_k_once_and_spreads_a_single_token_wide():
    for T, K, BR in [(1, 4096, 64), (1, 12288, 16), (256, 4096, 64), (16384, 12288, 64), (7, 300, 16)]:
        p, k_per = tl_lora.split_k(T, K, BR)
        assert k_per % tl_lora.BK == 0 and (p - 1) * k_per < K <= p * k_per  # every split has K to do
        assert p * T * BR * 4 <= max(tl_lora.PARTIAL_BYTES, T * BR * 4)
        assert p <= tl_lora.P_MAX or T > tl_lora.SLOT_AXIS_TOKENS  # the expand adds at most P_MAX itself
    assert tl_lora.split_k(1, 4096, 64)[0] == tl_lora.P_MAX  # decode: K over as many programs as the expand adds
    assert tl_lora.split_k(16384, 4096, 64)[0] == 1  # a long prefill has blocks enough


def test_every_token_on_slot_zero_returns_y_split_or_not(small_blocks):
    args = case(5, 40, 70, 3, 4, torch.bfloat16, slots=torch.zeros(5, dtype=torch.int64))
    assert torch.equal(tl_lora.lora_add_slots(*args), args[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_token_on_slot_zero_returns_y(dtype):
    args = case(5, 40, 70, 3, 4, dtype, slots=torch.zeros(5, dtype=torch.int64))
    assert torch.equal(tl_lora.lora_add_slots(*args), args[0])


@pytest.mark.parametrize("path", ["lora_add_slots", "lora_add_stacked"])
def test_strided_y_and_an_empty_batch(path):
    fn = getattr(tl_lora, path, None) or getattr(stacked, path)
    y, x, slots, a, b, scaling = case(6, 24, 40, 3, 4, torch.float32, slots=torch.tensor([1, 2, 0, 2, 1, 1]))
    wide = torch.randn(6, 80)
    wide[:, ::2] = y  # a non-contiguous y
    got = fn(wide[:, ::2], x, slots, a, b, scaling)
    torch.testing.assert_close(got, ref.lora_add_reference(y, x, slots, a, b, scaling), rtol=1e-5, atol=1e-5)
    empty = fn(y[:0], x[:0], slots[:0], a, b, scaling)
    assert empty.shape == (0, 40)


def side_by_side(b):
    """``b`` [S, N, R] as the pool holds it: a view of [N, S, R] storage."""
    return b.permute(1, 0, 2).contiguous().permute(1, 0, 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_the_stacked_products_match_the_twin(dtype):
    T, K, N, S, R = 40, 70, 50, 5, 8
    y, x, slots, a, b, scaling = case(T, K, N, S, R, dtype, rank=6, seed=3)
    for bb in (b, side_by_side(b)):
        got = stacked.lora_add_stacked(y, x, slots, a, bb, scaling)
        want = ref.lora_add_reference(y, x, slots, a, b, scaling)
        assert got.dtype == dtype and got.shape == (T, N)
        torch.testing.assert_close(got, want, **TOL[dtype])
        assert torch.equal(got[slots == 0], y[slots == 0])  # slot 0 adds nothing, even where its scaling is not 0
        assert not torch.allclose(got[slots != 0], y[slots != 0])


def test_the_triton_kernels_read_the_pools_side_by_side_b_in_place():
    args = case(7, 300, 150, 4, 8, torch.float32, slots=torch.tensor([0, 1, 3, 0, 2, 1, 3]))
    y, x, slots, a, b, scaling = args
    torch.testing.assert_close(tl_lora.lora_add_slots(y, x, slots, a, side_by_side(b), scaling),
                               ref.lora_add_reference(*args), rtol=1e-5, atol=1e-5)


def test_the_cuda_entry_takes_the_stacked_products_past_min_tokens_only():
    many = case(stacked.MIN_TOKENS + 1, 32, 48, 4, 8, torch.float32)
    few = case(stacked.MIN_TOKENS, 32, 48, 4, 8, torch.float32)
    assert stacked.chosen(many[1], many[3], 48) and not stacked.chosen(few[1], few[3], 48)
    assert torch.equal(tl_lora.lora_add_triton(*many), stacked.lora_add_stacked(*many))
    assert torch.equal(tl_lora.lora_add_triton(*few), tl_lora.lora_add_slots(*few))
    wide = case(stacked.MIN_TOKENS + 1, 32, 48, 2, stacked.MAX_COLUMNS // 2 + 1, torch.float32)
    assert not stacked.chosen(wide[1], wide[3], 48)  # too many stacked columns: the per-slot kernels


def test_wide_outputs_take_the_stacked_products_from_fewer_tokens(monkeypatch):
    monkeypatch.setattr(stacked, "WIDE_N", 48)  # the rule at a width the interpreter runs quickly
    at, below = (case(t, 32, 48, 4, 8, torch.float32) for t in (stacked.WIDE_MIN_TOKENS, stacked.WIDE_MIN_TOKENS - 1))
    assert stacked.chosen(at[1], at[3], 48) and not stacked.chosen(below[1], below[3], 48)
    assert not stacked.chosen(at[1], at[3], 47)  # a narrower output keeps the per-slot kernels to MIN_TOKENS
    assert torch.equal(tl_lora.lora_add_triton(*at), stacked.lora_add_stacked(*at))
    assert torch.equal(tl_lora.lora_add_triton(*below), tl_lora.lora_add_slots(*below))


def test_the_op_on_cpu_is_the_twin():
    args = case(9, 32, 48, 4, 8, torch.float32, slots=torch.tensor([3, 0, 1, 2, 2, 0, 1, 3, 1]))
    assert torch.equal(lora_ops.lora_add(*args), ref.lora_add_reference(*args))
    assert torch.equal(torch.ops.nanovllm.lora_add(*args), ref.lora_add_reference(*args))


def test_the_registered_cpu_kernel_runs_triton_or_the_twin_by_option():
    """``kernels/cuda.py``'s registered function, called directly (registering it for CPU would outlive the test)."""
    from nanovllm.kernels import cuda
    assert cuda.KERNELS["nanovllm::lora_add"] is cuda._lora_add
    args = case(4, 20, 30, 3, 4, torch.float32, slots=torch.tensor([2, 0, 1, 2]))
    torch.testing.assert_close(cuda._lora_add(*args), ref.lora_add_reference(*args), rtol=1e-5, atol=1e-5)


def folded(T, K, N, S, R, dtype, slots=None, rank=None, seed=0, bias=False):
    """(x, fold, bias, slots, b, scaling, N, a_row) as ``lora/pool.py`` stacks a projection: a weight [N, K], zero
    rows to a multiple of 16, then every slot's A; b side by side."""
    y, x, slots, a, b, scaling = case(T, K, N, S, R, dtype, slots=slots, rank=rank, seed=seed)
    weight = (torch.randn(N, K, generator=torch.Generator().manual_seed(seed + 1)) / K ** 0.5).to(dtype)
    pad = -(N + S * R) % 16
    fold = torch.cat([weight, weight.new_zeros(pad, K), a.reshape(S * R, K)])
    b_ = (torch.randn(N, dtype=torch.float32) * 0.1).to(dtype) if bias else None
    return x, fold, b_, slots, side_by_side(b), scaling, N, N + pad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T,block", [(1, 64), (7, 64), (45, 16)])
def test_the_expand_alone_matches_the_twin_on_the_stacked_shrink(dtype, T, block, monkeypatch):
    monkeypatch.setattr(tl_lora, "BT_MAX", block)  # 45 tokens: three token blocks
    slots = torch.arange(T) % 4
    x, fold, _, slots, b, scaling, n, a_row = folded(T, 70, 150, 4, 12, dtype, slots=slots, rank=9, seed=T)
    z = x @ fold.T  # the base outputs and every slot's shrink, read in place
    y, h = z[:, :n], z[:, a_row:]
    got, want = tl_lora.lora_expand_triton(y, h, slots, b, scaling), ref.lora_expand_reference(y, h, slots, b, scaling)
    assert got.dtype == dtype and got.shape == (T, n)
    torch.testing.assert_close(got, want, **TOL[dtype])
    assert torch.equal(got[slots == 0], y[slots == 0])
    if T > 1:
        assert not torch.allclose(got[slots != 0], y[slots != 0])
    # the expand of the stacked shrink is lora_add's product
    a = fold[a_row:].view(4, 12, 70)
    torch.testing.assert_close(want, ref.lora_add_reference(y, x, slots, a, b, scaling), **TOL[dtype])


def test_the_expand_alone_on_slot_zero_and_an_empty_batch():
    x, fold, _, slots, b, scaling, n, a_row = folded(5, 40, 70, 3, 4, torch.bfloat16,
                                                     slots=torch.zeros(5, dtype=torch.int64))
    z = x @ fold.T
    assert torch.equal(tl_lora.lora_expand_triton(z[:, :n], z[:, a_row:], slots, b, scaling), z[:, :n])
    assert tl_lora.lora_expand_triton(z[:0, :n], z[:0, a_row:], slots[:0], b, scaling).shape == (0, 70)


@pytest.mark.parametrize("bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("T", [folded_path.FOLD_MAX_TOKENS, folded_path.FOLD_MAX_TOKENS + 1])
def test_lora_linear_on_either_side_of_the_fold_limit_matches_the_twin(T, bias):
    """Up to the limit one product by the stack and the expand; past it the base rows and ``lora_add``."""
    args = folded(T, 40, 48, 4, 8, torch.float32, slots=torch.arange(T) % 4, bias=bias)
    want = ref.lora_linear_reference(*args)
    torch.testing.assert_close(folded_path.lora_linear_cuda(*args), want, rtol=1e-5, atol=1e-5)
    x, fold, b_, slots, b, scaling, n, a_row = args
    plain = x @ fold[:n].T + (0 if b_ is None else b_)
    assert torch.equal(want[slots == 0], plain[slots == 0]) and not torch.allclose(want, plain)


def test_the_linear_op_on_cpu_is_the_twin_and_cuda_registers_its_kernels():
    from nanovllm.kernels import cuda
    args = folded(9, 32, 48, 4, 8, torch.float32, slots=torch.tensor([3, 0, 1, 2, 2, 0, 1, 3, 1]))
    want = ref.lora_linear_reference(*args)
    assert torch.equal(lora_ops.lora_linear(*args), want)
    assert cuda.KERNELS["nanovllm::lora_linear"] is cuda._lora_linear
    torch.testing.assert_close(cuda._lora_linear(*args), want, rtol=1e-5, atol=1e-5)
