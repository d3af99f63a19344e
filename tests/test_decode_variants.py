"""The split-KV decode kernel (nanovllm/kernels/triton_decode.py) at its edges, against the pure-PyTorch twin, on CPU
under the Triton interpreter: padded rows (context 0), contexts shorter than one tile, contexts exactly at and next
to tile and split boundaries, mixed lengths, and the TMA tile loads.  Outputs and scratch start as NaN
(``poison``), so a value the kernel fails to write, or a reduce that reads an unwritten split, shows up.  The
launch grid does not depend on ``context_lens`` (CUDA-graph replay).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from nanovllm.kernels import reference as ref  # noqa: E402
from nanovllm.kernels import triton_decode as td  # noqa: E402
from tests.test_attention_kernels import BF16, F32, assert_close, make_cache, poison  # noqa: E402, F401


def run(ctx, *, num_kv_heads=2, group=2, head_dim=32, block_size=16, dtype=F32, seed=0, **kw):
    k, v, tables, lens = make_cache(ctx, num_kv_heads, head_dim, block_size, dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(len(ctx), group * num_kv_heads, head_dim, generator=gen).to(dtype)
    scale = head_dim ** -0.5
    want = ref.decode_attention_reference(q, k, v, tables, lens, scale)
    out = td.decode_attention_configured(q, k, v, tables, lens, scale, **kw)
    assert_close(out, want, dtype)
    for b, c in enumerate(ctx):
        if c == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b])), f"row {b} (context 0) is not zeros"
    return out


# Tiles of 16 tokens: 0 (padded), < 1 tile, tile edges, two tiles and more.
EDGES = [0, 1, 15, 16, 17, 31, 32, 33, 0, 64, 65, 100]


@pytest.mark.parametrize("num_splits", [None, 1, 3])
def test_edges_small_tiles(poison, num_splits):
    run(EDGES, block_n=16, num_splits=num_splits)


def test_edges_default_launch(poison):
    # Default tile (64) bigger than a cache block (16): tiles gather blocks; the default split count.
    run(EDGES + [127, 128, 129], block_size=16, dtype=BF16, seed=3)


def test_mixed_lengths_gqa(poison):
    gen = torch.Generator().manual_seed(7)
    ctx = torch.randint(1, 700, (10,), generator=gen).tolist()
    ctx[3] = 0
    run(ctx, num_kv_heads=2, group=4, head_dim=64, block_size=64, dtype=BF16, seed=7)


def test_all_rows_padded(poison):
    run([0, 0, 0], block_n=16, num_splits=2)


def _record_grids(monkeypatch, seen):
    """Wrap both decode kernels so each launch records (kernel, grid) before running."""
    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            seen.append((self.name, grid))
            return self.kernel[grid]
    for name in ("_decode_kernel", "_decode_reduce_kernel"):
        monkeypatch.setattr(td, name, Recorder(name, getattr(td, name)))


def test_grid_ignores_context_values(monkeypatch):
    # Same shapes, very different lengths: the same kernels with the same grids (what a CUDA graph replays).
    grids = []
    for ctx in ([1, 0, 2, 1], [100, 90, 0, 128]):
        seen = []
        _record_grids(monkeypatch, seen)
        k, v, tables, lens = make_cache([128, 128, 128, 128], 2, 32, 16, F32)
        lens = torch.tensor(ctx, dtype=torch.int32)
        q = torch.randn(4, 4, 32)
        out = td.decode_attention_configured(q, k, v, tables, lens, 0.2, block_n=16, num_splits=3)
        assert_close(out, ref.decode_attention_reference(q, k, v, tables, lens, 0.2), F32)
        grids.append(seen)
        monkeypatch.undo()
    assert grids[0] == grids[1] and len(grids[0]) == 2  # the split kernel and its reduce


def test_tma_tiles_match_pointer_loads(monkeypatch):
    """The TMA path (whole tiles through tensor descriptors, used on Hopper in bf16/fp16) gives bit-identical
    outputs to the pointer loads, with contexts ending inside, at and past tile edges and a padded row."""
    ctx = [0, 1, 15, 16, 17, 47, 48, 100]
    outs = {}
    for tma in (False, True):
        monkeypatch.setattr(td, "use_tma", lambda q, k_cache, block_n, _tma=tma: _tma)
        outs[tma] = run(ctx, dtype=BF16, block_size=16, block_n=16, seed=3, num_splits=2)
    assert torch.equal(outs[True], outs[False])


def test_tma_only_where_it_can_run():
    q = torch.zeros(2, 4, 32, dtype=torch.bfloat16)
    cache = torch.zeros(4, 2, 16, 32, dtype=torch.bfloat16)
    assert not td.use_tma(q, cache, 16)  # not CUDA
