"""Triton attention kernels against their pure-PyTorch twins, on CPU under the Triton interpreter.

The kernels (nanovllm/kernels/triton_attention.py) run here with TRITON_INTERPRET=1 on CPU tensors; the GPU
check and benchmark is benchmarks/attention_kernels.py.  Outputs are poisoned with NaN (torch.empty is patched
while a kernel wrapper runs), so an element the kernels fail to write shows up as non-finite.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from nanovllm.kernels import reference as ref  # noqa: E402
from nanovllm.kernels import triton_attention as ta  # noqa: E402

F32, BF16 = torch.float32, torch.bfloat16


def rel_err(out, want):
    out, want = out.double(), want.double()
    return ((out - want).norm() / want.norm().clamp_min(1e-30)).item()


def assert_close(out, want, dtype):
    assert torch.isfinite(out).all(), "non-finite output (an element left unwritten?)"
    err = rel_err(out, want)
    assert err < (1e-3 if dtype == F32 else 2e-2), f"relative error {err:.3e}"


@pytest.fixture
def poison(monkeypatch):
    """Make torch.empty return NaN-filled float tensors (outputs and split scratch of the wrappers)."""
    orig = torch.empty

    def empty(*args, **kwargs):
        t = orig(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t
    monkeypatch.setattr(torch, "empty", empty)


def make_cache(ctx_lens, num_kv_heads, head_dim, block_size, dtype, seed=0, spare=2):
    """Random caches with shuffled (non-contiguous) block tables; a context-0 row keeps an all-zero table."""
    gen = torch.Generator().manual_seed(seed)
    per_seq = [-(-c // block_size) for c in ctx_lens]
    num_blocks = sum(per_seq) + spare
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    tables = torch.zeros(len(ctx_lens), max(1, max(per_seq)), dtype=torch.int32)
    at = 0
    for b, n in enumerate(per_seq):
        tables[b, :n] = perm[at:at + n]
        at += n
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    k = torch.randn(shape, generator=gen).to(dtype)
    v = torch.randn(shape, generator=gen).to(dtype)
    return k, v, tables, torch.tensor(ctx_lens, dtype=torch.int32)


# ------------------------------------------------------------------------------------------------ store

@pytest.mark.parametrize("dtype,block_size,num_kv_heads,head_dim", [
    (F32, 16, 2, 64), (BF16, 64, 8, 128), (BF16, 16, 3, 32), (F32, 256, 1, 128)])
def test_store_kv_triton_matches_reference(dtype, block_size, num_kv_heads, head_dim):
    gen = torch.Generator().manual_seed(3)
    num_blocks, num_tokens = 6, 40
    # key/value as strided views of one fused projection, as a model produces them
    qkv = torch.randn(num_tokens, (2 * num_kv_heads + 2) * head_dim, generator=gen).to(dtype)
    key = qkv[:, 2 * head_dim:(2 + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    value = qkv[:, (2 + num_kv_heads) * head_dim:].view(num_tokens, num_kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(torch.int32)
    slots[::5] = -1  # padded rows
    k0 = torch.full((num_blocks, num_kv_heads, block_size, head_dim), float("nan"), dtype=dtype)
    v0 = torch.randn(k0.shape, generator=gen).to(dtype)
    kt, vt, kr, vr = k0.clone(), v0.clone(), k0.clone(), v0.clone()
    ta.store_kv_triton(key, value, kt, vt, slots)
    ref.store_kv_reference(key, value, kr, vr, slots)
    assert torch.equal(vt, vr)
    assert torch.equal(kt.isnan(), kr.isnan()) and torch.equal(kt.nan_to_num(0.0), kr.nan_to_num(0.0))


def test_store_kv_triton_all_padded_leaves_cache_untouched():
    key = torch.randn(5, 2, 64)
    k_cache, v_cache = torch.randn(3, 2, 16, 64), torch.randn(3, 2, 16, 64)
    k0, v0 = k_cache.clone(), v_cache.clone()
    ta.store_kv_triton(key, key, k_cache, v_cache, torch.full((5,), -1, dtype=torch.int32))
    assert torch.equal(k_cache, k0) and torch.equal(v_cache, v0)


# ----------------------------------------------------------------------------------------------- decode

def edge_contexts(block_size):
    """Padded row, one token, ends just before/at/after a block boundary, and a longer mid-block end."""
    return [0, 1, block_size - 1, block_size, block_size + 1, 3 * block_size + 5]


@pytest.mark.parametrize("head_dim,group,num_kv_heads,block_size,dtype", [
    (64, 1, 2, 16, F32), (64, 2, 2, 16, BF16), (64, 4, 1, 64, F32), (64, 8, 1, 64, BF16),
    (128, 1, 1, 64, BF16), (128, 2, 2, 64, F32), (128, 4, 1, 16, BF16), (128, 8, 1, 16, F32),
    (32, 2, 2, 16, F32), (16, 4, 1, 16, BF16), (64, 7, 2, 16, BF16)])  # group 7: rows padded to 16
def test_decode_attention_kernel_matches_reference(poison, head_dim, group, num_kv_heads, block_size, dtype):
    ctx = edge_contexts(block_size)
    k, v, tables, lens = make_cache(ctx, num_kv_heads, head_dim, block_size, dtype, seed=head_dim + group)
    q = torch.randn(len(ctx), group * num_kv_heads, head_dim).to(dtype)
    scale = head_dim ** -0.5
    want = ref.decode_attention_reference(q, k, v, tables, lens, scale)
    out = ta.decode_attention_triton(q, k, v, tables, lens, scale)
    assert_close(out, want, dtype)
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # context 0: zeros


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7])
def test_decode_attention_kernel_split_kv(poison, num_splits):
    # More splits than tiles in the shortest rows: empty splits must merge away cleanly.
    ctx = [0, 1, 70, 200, 33]
    k, v, tables, lens = make_cache(ctx, 2, 64, 16, BF16, seed=num_splits)
    q = torch.randn(len(ctx), 8, 64).to(BF16)
    want = ref.decode_attention_reference(q, k, v, tables, lens, 0.125)
    out = ta.decode_attention_configured(q, k, v, tables, lens, 0.125, num_splits=num_splits, block_n=32)
    assert_close(out, want, BF16)


@pytest.mark.parametrize("block_n", [16, 64, 128])
def test_decode_attention_kernel_tile_spans_blocks(poison, block_n):
    # block_n > block_size gathers several cache blocks per tile; block_n < block_size reads part of one.
    ctx = [5, 47, 100]
    k, v, tables, lens = make_cache(ctx, 1, 64, 32, F32, seed=block_n)
    q = torch.randn(len(ctx), 2, 64)
    want = ref.decode_attention_reference(q, k, v, tables, lens, 0.125)
    out = ta.decode_attention_configured(q, k, v, tables, lens, 0.125, block_n=block_n, num_splits=2)
    assert_close(out, want, F32)


def test_decode_attention_kernel_block_size_256_tiny_batch(poison):
    ctx = [255, 300]
    k, v, tables, lens = make_cache(ctx, 1, 128, 256, BF16, seed=9)
    q = torch.randn(2, 4, 128).to(BF16)
    want = ref.decode_attention_reference(q, k, v, tables, lens, 128 ** -0.5)
    assert_close(ta.decode_attention_triton(q, k, v, tables, lens, 128 ** -0.5), want, BF16)


def test_decode_attention_kernel_split_count_is_static():
    # The split count (hence the grid) depends on static shapes only, never on context_lens values.
    dev = torch.device("cpu")
    assert ta.decode_num_splits(8, 8, 1024, 16, 64, dev) == ta.decode_num_splits(8, 8, 1024, 16, 64, dev)
    assert ta.decode_num_splits(256, 8, 64, 16, 64, dev) == 1
    assert ta.decode_num_splits(1, 1, 1024, 16, 64, dev) > 1


# ---------------------------------------------------------------------------------------------- prefill

@pytest.mark.parametrize("head_dim,group,num_kv_heads,block_size,dtype,block_m,block_n", [
    (64, 1, 2, 16, F32, 16, 32),    # tiles gather two cache blocks
    (64, 2, 2, 16, BF16, 32, 16),
    (64, 4, 1, 64, F32, 16, 64),    # tile == cache block
    (64, 8, 1, 64, BF16, 64, 32),   # tile inside one block
    (128, 1, 1, 16, BF16, None, None),  # default launch config
    (128, 2, 2, 64, F32, None, None),
    (128, 4, 1, 16, F32, 32, 64),
    (128, 8, 1, 64, BF16, 16, 16),
    (32, 3, 2, 16, F32, 16, 32)])  # group 3 (not a power of two)
def test_prefill_attention_kernel_matches_reference(poison, head_dim, group, num_kv_heads, block_size, dtype,
                                                    block_m, block_n):
    # Fresh prompts, cached prefixes (context > q_len), a chunked prefill and single-token queries.
    q_lens = [37, 1, 20, 5, 64]
    prefix = [0, 40, 3 * block_size - 20, 0, block_size]
    ctx = [a + b for a, b in zip(q_lens, prefix)]
    check_prefill(q_lens, ctx, num_kv_heads, group * num_kv_heads, head_dim, block_size, dtype, head_dim * group,
                  head_dim ** -0.5, block_m, block_n)


def check_prefill(q_lens, ctx, num_kv_heads, num_q_heads, head_dim, block_size, dtype, seed, scale, block_m,
                  block_n):
    """The prefill kernel against the reference on a fresh cache and random queries; returns the kernel's output."""
    k, v, tables, lens = make_cache(ctx, num_kv_heads, head_dim, block_size, dtype, seed=seed)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(q_lens), num_q_heads, head_dim).to(dtype)
    want = ref.prefill_attention_reference(q, k, v, cu, lens, tables, scale)
    out = ta.prefill_attention_configured(q, k, v, cu, lens, tables, scale, block_m=block_m, block_n=block_n)
    assert_close(out, want, dtype)
    return out


def test_prefill_attention_kernel_query_tiles_span_sequences(poison):
    # Query tiles straddle sequence boundaries in the packed batch; each must land on its own rows.
    check_prefill([70, 33], [80, 33], 2, 4, 32, 16, F32, seed=21, scale=0.2, block_m=16, block_n=16)


def test_prefill_attention_kernel_empty_sequence_and_block_256(poison):
    # A sequence with no new tokens sits between two others; block size 256 at tiny batch.
    check_prefill([3, 0, 17], [253, 0, 17], 1, 2, 64, 256, BF16, seed=5, scale=0.125, block_m=16, block_n=64)


def test_prefill_attention_kernel_padding_sequence_of_many_tokens_gets_zeros(poison):
    # A prefill padded to a graph's token count puts the padding tokens in one sequence of context 0.  Its
    # positions are negative: it must attend to nothing (zeros) and read no block-table entry, in particular
    # not the row before its own, which belongs to a real sequence.
    out = check_prefill([40, 150], [40, 0], 2, 4, 32, 16, F32, seed=8, scale=0.2, block_m=16, block_n=16)
    assert torch.equal(out[40:], torch.zeros_like(out[40:]))


def test_prefill_attention_kernel_matches_decode_for_single_tokens(poison):
    # One new token per sequence: prefill and decode compute the same thing.
    ctx = [1, 16, 29, 64]
    k, v, tables, lens = make_cache(ctx, 2, 64, 16, F32, seed=11)
    q = torch.randn(4, 4, 64)
    cu = torch.arange(5, dtype=torch.int32)
    pre = ta.prefill_attention_configured(q, k, v, cu, lens, tables, 0.125, block_m=16, block_n=16)
    dec = ta.decode_attention_triton(q, k, v, tables, lens, 0.125)
    assert_close(pre, dec, F32)


# ------------------------------------------------------------------------------- decode rows in a prefill step

@pytest.mark.parametrize("dtype,group,num_kv_heads,block_size", [(F32, 4, 2, 16), (BF16, 8, 1, 64), (BF16, 3, 2, 16)])
def test_a_prefill_with_decode_rows_matches_reference(poison, dtype, group, num_kv_heads, block_size):
    # Decode rows (one query token over a long context) between prompt chunks, an empty sequence, and a trailing
    # padding sequence of one token and context 0: the prefill kernel leaves the one-token rows to the packed
    # decode kernel (``prefill_attention_triton``), and every row is written.
    q_lens = [1, 30, 1, 0, 9, 1, 1]
    ctx = [3 * block_size + 7, 30, 1, 0, 2 * block_size + 9, 5 * block_size, 0]
    k, v, tables, lens = make_cache(ctx, num_kv_heads, 64, block_size, dtype, seed=group)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)
    q = torch.randn(sum(q_lens), group * num_kv_heads, 64).to(dtype)
    want = ref.prefill_attention_reference(q, k, v, cu, lens, tables, 0.125)
    out = ta.prefill_attention_triton(q, k, v, cu, lens, tables, 0.125)
    assert_close(out, want, dtype)
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))  # the padding sequence: zeros


@pytest.mark.parametrize("num_splits", [1, 3])
def test_the_packed_decode_kernel_writes_only_one_token_sequences(poison, num_splits):
    # Split or not, the packed launch writes exactly the rows of one-token sequences (the others stay NaN).
    q_lens, ctx = [1, 4, 1], [70, 20, 33]
    k, v, tables, lens = make_cache(ctx, 2, 64, 16, BF16, seed=num_splits)
    cu = torch.tensor([0, 1, 5, 6], dtype=torch.int32)
    q = torch.randn(6, 8, 64).to(BF16)
    out = torch.full_like(q, float("nan"))
    ta.decode_attention_configured(q, k, v, tables, lens, 0.125, cu_seqlens_q=cu, out=out, num_splits=num_splits,
                                   block_n=16)
    want = ref.prefill_attention_reference(q, k, v, cu, lens, tables, 0.125)
    single = torch.tensor([True, False, False, False, False, True])
    assert out[~single].isnan().all()
    assert_close(out[single], want[single], BF16)


class SharedMemoryLimit:
    """A Triton kernel whose launches raise ``OutOfResources`` as the GPU's do when the tiles (a query tile and
    stage buffers of K and V tiles, head_dim wide, as a rough model) pass ``limit`` bytes; else it runs."""

    def __init__(self, kernel, limit: int, rows: int | None = None):
        self.kernel, self.limit, self.rows, self.launched = kernel, limit, rows, []

    def __getitem__(self, grid):
        def run(*args, **kw):
            from triton.runtime.errors import OutOfResources
            tiles = (kw.get("BLOCK_M", self.rows), kw["BLOCK_N"], kw["num_stages"])
            need = (tiles[0] + 2 * tiles[1] * tiles[2]) * kw["HEAD_DIM"] * 2
            self.launched.append((tiles, need <= self.limit))
            if need > self.limit:
                raise OutOfResources(need, self.limit, "shared memory")
            return self.kernel[grid](*args, **kw)
        return run


def test_a_head_too_wide_for_the_tuned_tiles_launches_with_smaller_ones(monkeypatch):
    """A 512-wide head (Gemma 4's full layers) asked 327,680 bytes of an H200's 232,448 at the tuned prefill tiles:
    the launch tries smaller tiles (stages, then BLOCK_N, then BLOCK_M) until one fits, gives the twin's result,
    and later launches start at the one that fit; the tuned tiles stay where they fit (heads up to 256)."""
    from nanovllm.kernels import triton_common, triton_decode
    from triton.runtime.errors import OutOfResources
    monkeypatch.setattr(triton_common, "_FITTED", {})
    assert triton_common.shrink_configs(64, 64, 3) == [(64, 64, 3), (64, 64, 2), (64, 32, 2), (64, 16, 2),
                                                       (32, 16, 2), (16, 16, 2), (16, 16, 1)]
    k, v, tables, lens = make_cache([40, 9], 1, 512, 16, BF16, seed=3)
    cu = torch.tensor([0, 40, 49], dtype=torch.int32)
    q = torch.randn(49, 2, 512).to(BF16)
    want = ref.prefill_attention_reference(q, k, v, cu, lens, tables, 0.05)
    prefill = SharedMemoryLimit(ta._prefill_kernel, limit=100_000)
    decode = SharedMemoryLimit(triton_decode._decode_kernel, limit=100_000, rows=16)
    monkeypatch.setattr(ta, "_prefill_kernel", prefill)
    monkeypatch.setattr(triton_decode, "_decode_kernel", decode)
    for _ in range(2):
        assert_close(ta.prefill_attention_triton(q, k, v, cu, lens, tables, 0.05), want, BF16)
    assert [t for t, fit in prefill.launched] == [(64, 64, 3), (64, 64, 2), (64, 32, 2), (64, 16, 2), (32, 16, 2),
                                                  (32, 16, 2)] and prefill.launched[-1][1]
    assert decode.launched[-1] == ((16, 16, 2), True) and decode.launched.count(decode.launched[-1]) == 2
    narrow = SharedMemoryLimit(prefill.kernel, limit=232_448)  # a 128-wide head: the tuned tiles
    monkeypatch.setattr(ta, "_prefill_kernel", narrow)
    ta.prefill_attention_triton(q[..., :128].contiguous(), k[..., :128].contiguous(), v[..., :128].contiguous(),
                                cu, lens, tables, 0.05)
    assert narrow.launched == [((64, 64, 3), True)]
    monkeypatch.setattr(ta, "_prefill_kernel", SharedMemoryLimit(prefill.kernel, limit=0))
    with pytest.raises(OutOfResources):  # no config fits: Triton's error
        ta.prefill_attention_triton(q, k, v, cu, lens, tables, 0.05)

