"""Sliding windows, attention sinks and logit softcaps in ``nanovllm::paged_attention``: the twin
(``reference.py``) against a dense float64 masked softmax written here, and the Triton decode (split and not),
varlen prefill and packed decode-in-prefill kernels against the twin, on CPU under the Triton interpreter.

The window convention is transformers' ``sliding_window_causal_mask_function``: the query at position p sees keys
p - W < j <= p.  Sinks follow GPT-OSS's ``eager_attention_forward`` (an extra logit column, dropped after the
softmax); the softcap Gemma 2's (``softcap * tanh(s / softcap)`` on scaled scores, before the mask).

Block skipping: with a window no implementation may read a KV block that lies wholly before the earliest key a
sequence's queries see in the step, whatever its block-table entry holds (-1 or a garbage id).  The poisoned cases
put -1 or the id of a NaN block in those entries, NaN in every position before that earliest key and in the
memory just before the cache (where block -1 would be), and require the same finite result.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from nanovllm.kernels import kv_quant  # noqa: E402
from nanovllm.kernels import reference as ref  # noqa: E402
from nanovllm.kernels import triton_attention as ta  # noqa: E402

F32, BF16 = torch.float32, torch.bfloat16
SCALE, CAP = 0.3, 2.0  # scores of about unit size at head_dim 32, so a cap of 2 bends them


def cu_of(q_lens):
    return torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)


def make_case(q_lens, ctx, num_kv_heads, group, head_dim, block_size, dtype, seed, width=None):
    """Caches in a buffer with one NaN block in front (what block id -1 would address), block 0 a NaN block no
    sequence owns (a garbage id), shuffled tables; q and sinks.  Returns (q, k, v, tables, lens, cu, sinks)."""
    gen = torch.Generator().manual_seed(seed)
    per_seq = [-(-c // block_size) for c in ctx]
    num_blocks = 1 + sum(per_seq) + 1
    perm = (1 + torch.randperm(num_blocks - 1, generator=gen)).to(torch.int32)
    tables = torch.zeros(len(ctx), width or max(1, max(per_seq)), dtype=torch.int32)
    at = 0
    for b, n in enumerate(per_seq):
        tables[b, :n] = perm[at:at + n]
        at += n
    shape = (num_blocks + 1, num_kv_heads, block_size, head_dim)
    caches = []
    for _ in range(2):
        buf = torch.randn(shape, generator=gen)
        buf[:2] = float("nan")  # the block before the cache and block 0
        caches.append(buf.to(dtype)[1:])
    num_q_heads = group * num_kv_heads
    q = torch.randn(sum(q_lens), num_q_heads, head_dim, generator=gen).to(dtype)
    sinks = torch.randn(num_q_heads, generator=gen) * 2 + 1
    return q, caches[0], caches[1], tables, torch.tensor(ctx, dtype=torch.int32), cu_of(q_lens), sinks


def poison(k, v, tables, q_lens, ctx, window, garbage):
    """What a window hides made unreadable: NaN written into k and v (in place, so -1 still addresses the NaN
    block in front) at the positions before each sequence's earliest visible key inside that key's block, and a
    copy of the tables returned with the entries of the blocks wholly before that key set to ``garbage`` (-1, or
    0: the NaN block)."""
    tables = tables.clone()
    block_size = k.shape[2]
    for b, (q_len, c) in enumerate(zip(q_lens, ctx)):
        earliest = max(c - q_len - window + 1, 0)
        if q_len == 0 or earliest == 0:
            continue
        for p in range(earliest - earliest % block_size, earliest):
            k[tables[b, p // block_size], :, p % block_size] = float("nan")
            v[tables[b, p // block_size], :, p % block_size] = float("nan")
        tables[b, :earliest // block_size] = garbage
    return k, v, tables


def dense_oracle(q, k_cache, v_cache, q_lens, ctx, tables, scale, window=0, sinks=None, softcap=0.0,
                 kv_scales=None):
    """float64 masked softmax, one sequence at a time over all its positions: keys j of query position p kept
    where j <= p and (window W > 0) j > p - W; softcap before the mask; sinks an extra logit column, dropped."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    block_size, group = k_cache.shape[2], q.shape[1] // k_cache.shape[1]
    row = 0
    for b, (q_len, c) in enumerate(zip(q_lens, ctx)):
        if q_len and c:
            j = torch.arange(c)
            blocks = tables[b, j // block_size].long()
            k, v = (cache[blocks, :, j % block_size].double() for cache in (k_cache, v_cache))  # [c, Hkv, D]
            if kv_scales is not None:
                k, v = k * kv_scales[0].double()[:, None], v * kv_scales[1].double()[:, None]
            k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
            p = torch.arange(c - q_len, c)
            s = torch.einsum("thd,jhd->htj", q[row:row + q_len].double(), k) * scale
            if softcap > 0:
                s = softcap * torch.tanh(s / softcap)
            allowed = j[None, :] <= p[:, None]
            if window > 0:
                allowed &= j[None, :] > p[:, None] - window
            s = s.masked_fill(~allowed, float("-inf"))
            if sinks is not None:
                s = torch.cat([s, sinks.double()[:, None, None].expand(-1, q_len, 1)], dim=-1)
            out[row:row + q_len] = torch.einsum("htj,jhd->thd", s.softmax(-1)[..., :c], v)
        row += q_len
    return out


def assert_close(out, want, dtype):
    assert torch.isfinite(out).all(), "non-finite output (a hidden position read, or a row left unwritten?)"
    err = ((out.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()
    assert err < (1e-3 if dtype == F32 else 2e-2), f"relative error {err:.3e}"


KINDS = [(0, False, 0.0), (7, False, 0.0), (16, True, 0.0), (5, True, CAP), (0, True, CAP), (300, False, CAP)]


# --------------------------------------------------------------------------------------- twin vs oracle

@pytest.mark.parametrize("window,with_sinks,softcap", KINDS)
@pytest.mark.parametrize("tile", [32, 4])
def test_prefill_twin_matches_dense_oracle(monkeypatch, window, with_sinks, softcap, tile):
    # Fresh prompts, prior context (chunked prefill), one-token rows, an empty sequence and a padding sequence;
    # tile 4 puts many query tiles in a sequence, so windows start in different blocks per tile.
    monkeypatch.setattr(ref, "_PREFILL_TILE", tile)
    q_lens, ctx = [9, 1, 6, 0, 13, 3], [9, 21, 30, 0, 27, 0]
    q, k, v, tables, lens, cu, sinks = make_case(q_lens, ctx, 2, 3, 16, 4, F32, seed=window + tile)
    sinks = sinks if with_sinks else None
    out = ref.paged_attention_reference(q, k, v, cu, lens, tables, SCALE, None, None, window, sinks, softcap)
    want = dense_oracle(q, k, v, q_lens, ctx, tables, SCALE, window, sinks, softcap)
    torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[-3:], torch.zeros_like(out[-3:]))  # the padding sequence


@pytest.mark.parametrize("window,with_sinks,softcap", KINDS)
def test_decode_twin_matches_dense_oracle(window, with_sinks, softcap):
    ctx = [0, 1, 4, 5, 11, 23]
    q, k, v, tables, lens, cu, sinks = make_case([1] * 6, ctx, 2, 2, 16, 4, F32, seed=window, width=7)
    sinks = sinks if with_sinks else None
    out = ref.paged_attention_reference(q, k, v, cu, lens, tables, SCALE, None, None, window, sinks, softcap)
    torch.testing.assert_close(out.double(), dense_oracle(q, k, v, [1] * 6, ctx, tables, SCALE, window, sinks,
                                                          softcap), rtol=1e-5, atol=1e-6)
    assert torch.equal(out[0], torch.zeros_like(out[0]))


def test_sinks_in_any_dtype_and_the_plain_path_unchanged():
    q_lens, ctx = [5, 1], [12, 7]
    q, k, v, tables, lens, cu, sinks = make_case(q_lens, ctx, 1, 4, 16, 4, F32, seed=3)
    plain = ref.paged_attention_reference(q, k, v, cu, lens, tables, SCALE)
    assert torch.equal(ref.paged_attention_reference(q, k, v, cu, lens, tables, SCALE, None, None, 0, None, 0.0),
                       plain)
    f32 = ref.paged_attention_reference(q, k, v, cu, lens, tables, SCALE, None, None, 0, sinks.bfloat16().float())
    assert torch.equal(ref.paged_attention_reference(q, k, v, cu, lens, tables, SCALE, None, None, 0,
                                                     sinks.bfloat16()), f32)
    with pytest.raises(ValueError, match="window"):
        ref.paged_attention_reference(q, k, v, cu, lens, tables, SCALE, None, None, -1)
    with pytest.raises(ValueError, match="sinks"):
        ref.paged_attention_reference(q, k, v, cu, lens, tables, SCALE, None, None, 0, sinks[:2])


@pytest.mark.parametrize("garbage", [-1, 0])
def test_twin_reads_nothing_before_the_window(monkeypatch, garbage):
    monkeypatch.setattr(ref, "_PREFILL_TILE", 4)
    q_lens, ctx, window = [6, 1, 9, 1], [30, 26, 9, 3], 6
    q, k, v, tables, lens, cu, sinks = make_case(q_lens, ctx, 2, 2, 16, 4, F32, seed=7)
    want = ref.paged_attention_reference(q, k, v, cu, lens, tables, SCALE, None, None, window, sinks, CAP)
    kp, vp, tp = poison(k, v, tables, q_lens, ctx, window, garbage)
    assert (tp == garbage).sum() >= 8
    assert torch.equal(ref.paged_attention_reference(q, kp, vp, cu, lens, tp, SCALE, None, None, window, sinks, CAP),
                       want)
    dec = [1, 1, 1, 1]  # decode rows: everything before ctx - window is hidden
    q, k, v, tables, lens, cu, sinks = make_case(q_lens, ctx, 2, 2, 16, 4, F32, seed=7)
    want = ref.paged_attention_reference(q[:4], k, v, cu_of(dec), lens, tables, SCALE, None, None, window, sinks)
    kp, vp, tp = poison(k, v, tables, dec, ctx, window, garbage)
    got = ref.paged_attention_reference(q[:4], kp, vp, cu_of(dec), lens, tp, SCALE, None, None, window, sinks)
    assert torch.equal(got, want)


# ------------------------------------------------------------------------------------- Triton vs twin

@pytest.mark.parametrize("window,with_sinks,softcap,block_size,block_n,splits,group,dtype", [
    (9, True, 0.0, 16, 16, 1, 2, F32),      # window ends mid-block; tile == block
    (9, True, CAP, 16, 16, 3, 4, BF16),     # split decode: the sink joins split 0 only
    (20, False, CAP, 8, 32, 2, 1, F32),     # tiles span several blocks: masked table loads before the window
    (33, True, 0.0, 32, 16, 4, 3, BF16),    # tiles inside a block; more splits than window tiles
    (500, True, CAP, 16, 16, 2, 2, F32),    # window larger than any context
    (0, True, CAP, 16, 16, 2, 2, F32),      # sinks and softcap, full causal
])
@pytest.mark.parametrize("garbage", [-1, 0])
def test_decode_kernel_matches_twin(window, with_sinks, softcap, block_size, block_n, splits, group, dtype, garbage):
    ctx = [0, 1, 9, 16, 47, 70]
    q, k, v, tables, lens, _, sinks = make_case([1] * 6, ctx, 2, group, 32, block_size, dtype, seed=window)
    sinks = sinks if with_sinks else None
    want = ref.decode_attention_reference(q, k, v, tables, lens, SCALE, None, None, window, sinks, softcap)
    if window:
        k, v, tables = poison(k, v, tables, [1] * 6, ctx, window, garbage)
    out = ta.decode_attention_configured(q, k, v, tables, lens, SCALE, None, None, window, sinks, softcap,
                                         num_splits=splits, block_n=block_n)
    assert_close(out, want, dtype)
    assert torch.equal(out[0], torch.zeros_like(out[0]))


@pytest.mark.parametrize("window,with_sinks,softcap,block_size,block_m,block_n,group,dtype", [
    (10, True, 0.0, 16, 16, 16, 2, F32),    # window < a tile: edge tiles, then the diagonal
    (37, True, CAP, 8, 16, 32, 1, BF16),    # tiles span blocks; window ends mid-block
    (24, False, CAP, 32, 32, 16, 3, F32),   # tiles inside a block; unmasked tiles between edge and diagonal
    (1, True, 0.0, 16, 16, 16, 2, F32),     # window 1: each query sees itself only
    (400, True, CAP, 16, 16, 16, 2, BF16),  # window larger than any context
    (0, True, CAP, 16, 32, 16, 2, F32),     # sinks and softcap, full causal
])
@pytest.mark.parametrize("garbage", [-1, 0])
def test_prefill_kernel_matches_twin(window, with_sinks, softcap, block_size, block_m, block_n, group, dtype,
                                     garbage):
    # Fresh prompts, chunked prefill with prior context, a one-token row, an empty sequence, a padding sequence.
    q_lens, ctx = [37, 20, 1, 0, 45, 3], [37, 80, 50, 0, 61, 0]
    q, k, v, tables, lens, cu, sinks = make_case(q_lens, ctx, 2, group, 32, block_size, dtype, seed=window + 1)
    sinks = sinks if with_sinks else None
    want = ref.prefill_attention_reference(q, k, v, cu, lens, tables, SCALE, None, None, window, sinks, softcap)
    if window:
        k, v, tables = poison(k, v, tables, q_lens, ctx, window, garbage)
    out = ta.prefill_attention_configured(q, k, v, cu, lens, tables, SCALE, None, None, window, sinks, softcap,
                                          block_m=block_m, block_n=block_n)
    assert_close(out, want, dtype)
    assert torch.equal(out[-3:], torch.zeros_like(out[-3:]))


@pytest.mark.parametrize("window,softcap", [(12, 0.0), (0, CAP)])
def test_prefill_with_decode_rows_matches_twin(window, softcap):
    # prefill_attention_triton: the one-token rows go to the packed decode kernel (split), the rest to prefill.
    q_lens, ctx = [1, 30, 1, 9, 1], [70, 45, 1, 40, 0]
    q, k, v, tables, lens, cu, sinks = make_case(q_lens, ctx, 2, 2, 32, 16, BF16, seed=11)
    want = ref.paged_attention_reference(q, k, v, cu, lens, tables, SCALE, None, None, window, sinks, softcap)
    if window:
        k, v, tables = poison(k, v, tables, q_lens, ctx, window, -1)
    out = ta.prefill_attention_triton(q, k, v, cu, lens, tables, SCALE, None, None, window, sinks, softcap)
    assert_close(out, want, BF16)
    assert torch.equal(out[-1], torch.zeros_like(out[-1]))


def test_fp8_cache_with_window_sinks_and_softcap():
    q_lens, ctx = [1, 1, 20, 1], [40, 7, 52, 0]
    q, k, v, tables, lens, cu, sinks = make_case(q_lens, ctx, 2, 2, 32, 16, F32, seed=5)
    scales = (torch.tensor([0.02, 0.05]), torch.tensor([0.03, 0.01]))
    k8, v8 = ((c / s[:, None, None]).to(kv_quant.FP8_DTYPE) for c, s in zip((k, v), scales))
    args = (SCALE, *scales, 11, sinks, CAP)
    want = ref.paged_attention_reference(q, k8, v8, cu, lens, tables, *args)
    oracle = dense_oracle(q, k8.float(), v8.float(), q_lens, ctx, tables, SCALE, 11, sinks, CAP, scales)
    torch.testing.assert_close(want.double(), oracle, rtol=1e-4, atol=1e-5)
    k8, v8, tables = poison(k8, v8, tables, q_lens, ctx, 11, 0)  # 0: the NaN block (k8 has none in front)
    assert_close(ta.prefill_attention_triton(q, k8, v8, cu, lens, tables, *args), want, F32)
    dec = [0, 1, 3]  # the decode rows alone, split
    want = ref.decode_attention_reference(q[dec], k8, v8, tables, lens[[0, 1, 3]], *args)
    got = ta.decode_attention_configured(q[dec], k8, v8, tables, lens[[0, 1, 3]], *args, num_splits=2, block_n=16)
    assert_close(got, want, F32)


# ---------------------------------------------------------------------------------- the op and its routes

def test_op_traces_and_the_cuda_route_takes_the_kinds():
    from torch.fx.experimental.proxy_tensor import make_fx

    from nanovllm.kernels import cuda, ops
    q_lens, ctx = [1, 1, 1], [30, 5, 0]
    q, k, v, tables, lens, cu, sinks = make_case(q_lens, ctx, 2, 2, 32, 16, F32, seed=2)
    args = (q, k, v, cu, lens, tables, SCALE, None, None, 9, sinks, CAP)
    torch.library.opcheck(torch.ops.nanovllm.paged_attention.default, args,
                          test_utils=("test_schema", "test_faketensor"))
    want = ref.paged_attention_reference(*args)
    assert torch.equal(ops.paged_attention(q, k, v, cu, lens, tables, SCALE, window=9, sinks=sinks, softcap=CAP),
                       want)
    for fn in (ref.decode_attention_reference, ref.prefill_attention_reference):  # static shapes: no host reads
        call = (q, k, v, tables, lens) if fn is ref.decode_attention_reference else (q, k, v, cu, lens, tables)
        graph = make_fx(lambda s, *a: fn(*a, SCALE, None, None, 9, s, CAP), tracing_mode="fake")(sinks, *call).graph
        assert not [n for n in graph.nodes if "_local_scalar_dense" in str(n.target)]
    assert_close(cuda._paged_attention(*args), want, F32)  # the decode kernel
    q_lens, ctx = [20, 1], [40, 9]
    q, k, v, tables, lens, cu, sinks = make_case(q_lens, ctx, 2, 2, 32, 16, F32, seed=4)
    args = (q, k, v, cu, lens, tables, SCALE, None, None, 9, sinks, CAP)
    assert_close(cuda._paged_attention(*args), ref.paged_attention_reference(*args), F32)  # prefill + packed decode
