"""The pure-PyTorch twins (nanovllm/kernels/reference.py, logits.py, sampling.py): exact against a naive oracle,
blind to what the cache holds past a context, and free of host synchronisation and data-dependent shapes, proven by
tracing each one with fake tensors (``make_fx``) and with Dynamo under ``fullgraph=True``."""
import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, DynamicOutputShapeException
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from nanovllm.kernels import logits as logits_twin
from nanovllm.kernels import moe_reference
from nanovllm.kernels import reference as ref
from nanovllm.kernels import sampling
from nanovllm.layers.rotary import RotaryEmbedding


def make_cache(ctx_lens, num_kv_heads=2, head_dim=16, block_size=4, width=None, seed=0):
    """Random caches, shuffled block tables ``width`` columns wide (unused entries 0), context lengths."""
    gen = torch.Generator().manual_seed(seed)
    per_seq = [-(-c // block_size) for c in ctx_lens]
    width = width or max(1, max(per_seq))
    num_blocks = sum(per_seq) + 2
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    tables = torch.zeros(len(ctx_lens), width, dtype=torch.int32)
    at = 0
    for b, n in enumerate(per_seq):
        tables[b, :n] = perm[at:at + n]
        at += n
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    return torch.randn(shape, generator=gen), torch.randn(shape, generator=gen), tables, torch.tensor(ctx_lens)


def naive_prefill(q, k_cache, v_cache, q_lens, ctx_lens, tables, scale):
    """Float64 causal attention, one sequence and one query token at a time (host loops: a test oracle only)."""
    out = torch.zeros(q.shape, dtype=torch.float64)
    block_size, group = k_cache.shape[2], q.shape[1] // k_cache.shape[1]
    row = 0
    for b, (q_len, ctx) in enumerate(zip(q_lens, ctx_lens)):
        slots = [(int(tables[b, p // block_size]), p % block_size) for p in range(ctx)]
        k = torch.stack([k_cache[blk, :, off] for blk, off in slots]).double() if slots else None  # [L, Hkv, D]
        v = torch.stack([v_cache[blk, :, off] for blk, off in slots]).double() if slots else None
        for j in range(q_len):
            pos = ctx - q_len + j
            if pos >= 0:
                for h in range(q.shape[1]):
                    s = (k[:pos + 1, h // group] @ q[row + j, h].double()) * scale
                    out[row + j, h] = s.softmax(0) @ v[:pos + 1, h // group]
        row += q_len
    return out


def cu_of(q_lens):
    return torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32)


@pytest.mark.parametrize("tile", [32, 4])
def test_prefill_twin_matches_the_naive_oracle(monkeypatch, tile):
    # Fresh prompts, a cached prefix, one-token sequences, a sequence with no new tokens, and a padding sequence
    # (context 0, several tokens); tile 4 puts many query tiles in one sequence and tiles across sequences.
    monkeypatch.setattr(ref, "_PREFILL_TILE", tile)
    q_lens, ctx = [9, 1, 6, 0, 3, 4], [9, 13, 17, 0, 3, 0]
    k, v, tables, lens = make_cache(ctx, width=6)
    q = torch.randn(sum(q_lens), 4, 16)
    out = ref.prefill_attention_reference(q, k, v, cu_of(q_lens), lens, tables, 0.3)
    torch.testing.assert_close(out.double(), naive_prefill(q, k, v, q_lens, ctx, tables, 0.3), rtol=1e-5, atol=1e-6)
    assert torch.equal(out[-4:], torch.zeros_like(out[-4:]))  # the padding sequence


def test_decode_twin_matches_prefill_twin_and_oracle():
    ctx = [0, 1, 4, 5, 11]
    k, v, tables, lens = make_cache(ctx, width=4)
    q = torch.randn(len(ctx), 6, 16)
    dec = ref.decode_attention_reference(q, k, v, tables, lens, 0.25)
    pre = ref.prefill_attention_reference(q, k, v, torch.arange(len(ctx) + 1, dtype=torch.int32), lens, tables, 0.25)
    torch.testing.assert_close(dec, pre, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dec.double(), naive_prefill(q, k, v, [1] * len(ctx), ctx, tables, 0.25), rtol=1e-5,
                               atol=1e-6)
    assert torch.equal(dec[0], torch.zeros_like(dec[0]))


def test_attention_twins_ignore_the_cache_past_each_context():
    ctx = [3, 6]
    k, v, tables, lens = make_cache(ctx, width=3)
    q = torch.randn(2, 4, 16)
    want = ref.decode_attention_reference(q, k, v, tables, lens, 0.25)
    for b, c in enumerate(ctx):  # NaN in the rest of each row's last block, and in every block no row uses
        k[tables[b, (c - 1) // 4], :, (c - 1) % 4 + 1:] = float("nan")
        v[tables[b, (c - 1) // 4], :, (c - 1) % 4 + 1:] = float("nan")
    used = set(tables[0, :1].tolist() + tables[1, :2].tolist())
    for blk in set(range(k.shape[0])) - used:
        k[blk], v[blk] = float("nan"), float("inf")
    assert torch.equal(ref.decode_attention_reference(q, k, v, tables, lens, 0.25), want)


def test_attention_twin_in_tile_groups_equals_one_group(monkeypatch):
    q_lens, ctx = [7, 2, 5], [7, 10, 5]
    k, v, tables, lens = make_cache(ctx, width=5)
    q = torch.randn(sum(q_lens), 4, 16)
    monkeypatch.setattr(ref, "_PREFILL_TILE", 2)
    whole = ref.prefill_attention_reference(q, k, v, cu_of(q_lens), lens, tables, 0.3)
    monkeypatch.setattr(ref, "_CHUNK_ELEMENTS", 1)  # one tile per group
    torch.testing.assert_close(ref.prefill_attention_reference(q, k, v, cu_of(q_lens), lens, tables, 0.3), whole,
                               rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("slots", [[5, -1, 0, -1, 9], [-1, -1, 2, 7, -1], [-1, -1, -1, -1, -1]])
def test_store_twin_writes_real_rows_and_nothing_else(slots):
    key, value = torch.randn(5, 2, 8), torch.randn(5, 2, 8)
    k_cache, v_cache = torch.randn(3, 2, 4, 8), torch.randn(3, 2, 4, 8)
    k_cache[0, :, 0] = float("nan")  # slot 0 (the fallback when no row is real) holds NaN: written back as is
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for row, slot in enumerate(slots):
        if slot >= 0:
            want_k[slot // 4, :, slot % 4], want_v[slot // 4, :, slot % 4] = key[row], value[row]
    ref.store_kv_reference(key, value, k_cache, v_cache, torch.tensor(slots, dtype=torch.int32))
    torch.testing.assert_close(k_cache, want_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, want_v, rtol=0, atol=0)


def _twin_calls():
    """(name, function, example arguments) of every twin, on small shapes."""
    k, v, tables, lens = make_cache([5, 0, 9], width=4)
    q_lens = [2, 3, 1]
    rope = RotaryEmbedding(16, 32, 10000.0)
    qkv = torch.randn(6, (4 + 2 * 2) * 16)
    logits, temp = torch.randn(3, 50), torch.tensor([0.0, 1.0, 0.5])
    seeds, positions = torch.tensor([1, 2, 3]), torch.tensor([4, 5, 6])
    return [
        ("store_kv", ref.store_kv_reference, (torch.randn(3, 2, 16), torch.randn(3, 2, 16), k, v,
                                              torch.tensor([1, -1, 7], dtype=torch.int32))),
        ("decode", ref.decode_attention_reference, (torch.randn(3, 4, 16), k, v, tables, lens, 0.25)),
        ("prefill", ref.prefill_attention_reference, (torch.randn(6, 4, 16), k, v, cu_of(q_lens), lens, tables,
                                                      0.25)),
        ("rope_store_kv", ref.rope_store_kv_reference, (qkv, torch.arange(6), rope.cos_cache, rope.sin_cache,
                                                        torch.ones(16), torch.ones(16), 1e-6, k, v,
                                                        torch.tensor([0, 1, -1, 3, 4, 5], dtype=torch.int32), 4, 2)),
        ("linear", ref.linear_reference, (torch.randn(3, 8), torch.randn(10, 8), torch.randn(10), True)),
        ("fused_moe", moe_reference.fused_moe_reference, (torch.randn(5, 8), torch.randn(5, 4), torch.randn(4, 12, 8),
                                                          torch.randn(4, 8, 6), 2, True)),
        ("moe_align", moe_reference.align_reference, (torch.randint(0, 4, (5, 2)), 4, 4)),
        ("process_logits", logits_twin.process_logits_reference,
         (logits, torch.tensor([1, 0, 1]), torch.tensor([[0.0, 1.0, 0.0, 0.0], [1.0, 1.2, 0.5, 0.5]]),
          torch.tensor([[-1, 7], [5, -2**31]], dtype=torch.int32), torch.randint(0, 3, (2, 50), dtype=torch.int32),
          torch.rand(2, 50) < 0.5)),
        ("gumbel_argmax", sampling.gumbel_argmax_reference, (logits, temp, seeds, positions)),
        ("filtered", sampling.filtered_gumbel_argmax, (logits, temp, torch.tensor([-1, 3, 5]),
                                                       torch.tensor([1.0, 0.9, 0.5]), seeds, positions)),
    ]


def host_syncs(fn, args) -> list[str]:
    """The nodes of ``fn``'s trace with fake tensors (which hold no values) that read a tensor's value on the host
    (``.item()``, ``.tolist()``, a 0-d tensor used as an index) or whose shape depends on values (``nonzero``, a
    boolean-mask index): the first show up as ``_local_scalar_dense``, the second as data-dependent sizes."""
    try:
        graph = make_fx(lambda *a: fn(*a), tracing_mode="fake")(*args).graph
    except (GuardOnDataDependentSymNode, DynamicOutputShapeException, DataDependentOutputException) as e:
        return [f"tracing stopped at a value read: {type(e).__name__}"]
    found = []
    for node in graph.nodes:
        val = node.meta.get("val")
        dynamic = isinstance(val, torch.Tensor) and not all(isinstance(d, int) for d in val.shape)
        if dynamic or "_local_scalar_dense" in str(node.target):
            found.append(f"{node.target} -> {getattr(val, 'shape', val)}")
    return found


@pytest.mark.parametrize("name,fn,args", _twin_calls(), ids=[c[0] for c in _twin_calls()])
def test_twin_traces_with_fake_tensors(name, fn, args):
    assert host_syncs(fn, args) == []


@pytest.mark.parametrize("name,fn,args", _twin_calls(), ids=[c[0] for c in _twin_calls()])
def test_twin_compiles_as_one_graph(name, fn, args):
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_scalar_outputs=False, capture_dynamic_output_shape_ops=False):
        torch.compile(fn, backend="eager", fullgraph=True)(*args)


def test_the_trace_check_catches_a_host_sync():
    assert host_syncs(lambda lens: torch.zeros(sum(lens.tolist())), (torch.tensor([1, 2]),))
    assert host_syncs(lambda x: x[x > 0] * 2, (torch.randn(4),))
    assert host_syncs(lambda x, i: x[:, i] + 1, (torch.randn(4, 3), torch.tensor(1)))
