"""Every decode-attention variant (nanovllm/kernels/triton_decode*.py) against the pure-PyTorch reference, on CPU
under the Triton interpreter: padded rows (context 0), contexts shorter than one tile, contexts exactly at and
next to tile / chunk / program boundaries, and mixed lengths.  Outputs and scratch start as NaN (``poison``), so
a value a kernel fails to write, or a reduce that reads an unwritten split, shows up.  Also: the launch grid does
not depend on ``context_lens`` (CUDA-graph replay), and ``NANOVLLM_DECODE_VARIANT`` selects the default.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from nanovllm.kernels import reference as ref  # noqa: E402
from nanovllm.kernels import triton_decode as td  # noqa: E402
from nanovllm.kernels import triton_decode_streamk as tsk  # noqa: E402
from tests.test_attention_kernels import BF16, F32, assert_close, make_cache, poison  # noqa: E402, F401

VARIANTS = sorted(td.DECODE_VARIANTS)


def run(variant, ctx, *, num_kv_heads=2, group=2, head_dim=32, block_size=16, dtype=F32, seed=0, **kw):
    k, v, tables, lens = make_cache(ctx, num_kv_heads, head_dim, block_size, dtype, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    q = torch.randn(len(ctx), group * num_kv_heads, head_dim, generator=gen).to(dtype)
    scale = head_dim ** -0.5
    want = ref.decode_attention_reference(q, k, v, tables, lens, scale)
    out = td.decode_attention_configured(q, k, v, tables, lens, scale, variant=variant, **kw)
    assert_close(out, want, dtype)
    for b, c in enumerate(ctx):
        if c == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b])), f"row {b} (context 0) is not zeros"
    return out


# Tiles of 16 tokens, chunks of 2 tiles (32 tokens): 0 (padded), < 1 tile, tile edges, chunk edges, longer.
EDGES = [0, 1, 15, 16, 17, 31, 32, 33, 0, 64, 65, 100]


@pytest.mark.parametrize("variant", VARIANTS)
def test_edges_small_tiles(poison, variant):
    # chunk: 2-tile chunks, 4 splits of which most rows leave some empty; streamk: 8 programs (1 per "SM" on CPU)
    # over 2 x 26 tiles, so runs cross rows and rows span programs.
    run(variant, EDGES, block_n=16, chunk_tiles=2, programs_per_sm=1)


@pytest.mark.parametrize("variant", VARIANTS)
def test_edges_default_launch(poison, variant):
    # Default tile (64) bigger than a cache block (16): tiles gather blocks; the variant's own split / grid sizes.
    run(variant, EDGES + [127, 128, 129], block_size=16, dtype=BF16, seed=3)


@pytest.mark.parametrize("variant", VARIANTS)
def test_mixed_lengths_gqa(poison, variant):
    gen = torch.Generator().manual_seed(7)
    ctx = torch.randint(1, 700, (10,), generator=gen).tolist()
    ctx[3] = 0
    run(variant, ctx, num_kv_heads=2, group=4, head_dim=64, block_size=64, dtype=BF16, seed=7)


@pytest.mark.parametrize("programs_per_sm", [1, 3])
def test_streamk_program_boundaries(poison, programs_per_sm):
    # 8 or 24 programs; group 3 pads the dot to 16 rows and the scratch to 3 rows per segment.
    run("streamk", [50, 0, 3, 48, 49, 16, 200], num_kv_heads=1, group=3, block_n=16,
        programs_per_sm=programs_per_sm, seed=programs_per_sm)


@pytest.mark.parametrize("variant", VARIANTS)
def test_all_rows_padded(poison, variant):
    run(variant, [0, 0, 0], block_n=16, chunk_tiles=1, programs_per_sm=1)


@pytest.mark.parametrize("variant", ["chunk", "chunk_rev"])
@pytest.mark.parametrize("chunk_tiles", [1, 3, 8])
def test_chunk_sizes(poison, variant, chunk_tiles):
    # chunk 8 covers the whole table (a single split, no reduce); chunk 3 leaves a short last split.
    run(variant, [0, 47, 48, 49, 96, 97, 112], block_n=16, chunk_tiles=chunk_tiles, seed=chunk_tiles)


def _record_grids(monkeypatch, seen):
    """Wrap every decode kernel so each launch records (kernel, grid) before running."""
    class Recorder:
        def __init__(self, name, kernel):
            self.name, self.kernel = name, kernel

        def __getitem__(self, grid):
            seen.append((self.name, tuple(grid)))
            return self.kernel[grid]
    for mod, name in [(td, "_decode_kernel"), (td, "_decode_reduce_kernel"), (tsk, "_streamk_kernel"),
                      (tsk, "_streamk_reduce_kernel")]:
        monkeypatch.setattr(mod, name, Recorder(name, getattr(mod, name)))


@pytest.mark.parametrize("variant", VARIANTS)
def test_grid_ignores_context_values(monkeypatch, variant):
    # Same shapes, very different lengths: the same kernels with the same grids (what a CUDA graph replays).
    grids = []
    for ctx in ([1, 0, 2, 1], [100, 90, 0, 128]):
        seen = []
        _record_grids(monkeypatch, seen)
        k, v, tables, lens = make_cache([128, 128, 128, 128], 2, 32, 16, F32)
        lens = torch.tensor(ctx, dtype=torch.int32)
        q = torch.randn(4, 4, 32)
        out = td.decode_attention_configured(q, k, v, tables, lens, 0.2, variant=variant, block_n=16)
        assert_close(out, ref.decode_attention_reference(q, k, v, tables, lens, 0.2), F32)
        grids.append(seen)
        monkeypatch.undo()
    assert grids[0] == grids[1] and grids[0]


def test_env_var_selects_default(monkeypatch):
    monkeypatch.delenv("NANOVLLM_DECODE_VARIANT", raising=False)
    assert td.decode_variant() == td.DEFAULT_VARIANT
    for name in VARIANTS:
        monkeypatch.setenv("NANOVLLM_DECODE_VARIANT", name)
        assert td.decode_variant() == name
    monkeypatch.setenv("NANOVLLM_DECODE_VARIANT", "nope")
    with pytest.raises(ValueError):
        td.decode_variant()


def test_chunk_size_is_static_and_shrinks_for_small_batches():
    dev = torch.device("cpu")  # 8 "SMs" under the interpreter
    big = td.decode_chunk_tiles(256, 8, 64, dev)
    small = td.decode_chunk_tiles(1, 8, 64, dev)
    assert big == 8 and 1 <= small < big


@pytest.mark.parametrize("variant", ["legacy", "chunk"])
def test_tma_tiles_match_pointer_loads(variant, monkeypatch):
    """The TMA path (whole tiles through tensor descriptors, used on Hopper in bf16/fp16) gives bit-identical
    outputs to the pointer loads, with contexts ending inside, at and past tile edges and a padded row."""
    ctx = [0, 1, 15, 16, 17, 47, 48, 100]
    outs = {}
    for tma in (False, True):
        monkeypatch.setattr(td, "use_tma", lambda q, k_cache, block_n, _tma=tma: _tma)
        outs[tma] = run(variant, ctx, dtype=BF16, block_size=16, block_n=16, seed=3)
    assert torch.equal(outs[True], outs[False])


def test_tma_only_where_it_can_run(monkeypatch):
    q = torch.zeros(2, 4, 32, dtype=torch.bfloat16)
    cache = torch.zeros(4, 2, 16, 32, dtype=torch.bfloat16)
    assert not td.use_tma(q, cache, 16)  # not CUDA
