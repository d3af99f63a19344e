"""Fused Gumbel-max sampling for CUDA: each row's token drawn in one read of the logits.

``gumbel_argmax_triton`` is the CUDA implementation of the op ``nanovllm::gumbel_argmax`` (``sampling.py`` holds the
torch twin and the definition of the hash).  Per row it returns
* T > 0: argmax over v of ``logits[v] * (1 / max(T, 1e-6)) + gumbel(seed, position, v)``;
* T <= 0: argmax over v of ``logits[v]`` (greedy),
ties going to the smallest index, as ``torch.argmax``.  The noise is the reference's, computed in ``tl.uint32`` and
turned into the same float32 uniforms bit for bit, so both paths draw the same tokens except at float-rounding-level
near-ties of the final scores (``tl.log`` may differ from a ``log`` by an ulp).

Two stages: a (row, split) grid of programs, each keeping its split's best, then one program per row taking the
best split.  The split count depends only on (B, V) and the SM count, never on data, so a launch can be captured
in a CUDA graph.  With ``skip=True`` (the default) a program computes the precise noise of a tile only where a cheap
upper bound could beat its best score so far; the tokens are exactly those of ``skip=False``.
``gumbel_noise_triton`` writes the kernel's uniforms and noise for a [B, V] grid: a debugging and test aid.
"""
import torch
import triton
import triton.language as tl

from nanovllm.kernels.pdl import pdl_begin, pdl_launch
from nanovllm.kernels.triton_common import _num_sms

# Tuned on a GPU over BLOCK 512-4096, 4/8 warps and 2-8 programs per SM.
BLOCK = 1024  # vocabulary ids per tile
NUM_WARPS = 8
PROGRAMS_PER_SM = 8  # stage-1 programs aimed at when the batch alone does not fill the GPU
_INT32_MAX = 2**31 - 1
_MAX_INDEX = tl.constexpr(_INT32_MAX)  # a global read inside a kernel must be a constexpr


@triton.jit
def _mix32(x):
    """The 32-bit finaliser of ``sampling.mix32`` on uint32 (the products wrap mod 2**32)."""
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    return x ^ (x >> 15)


@triton.jit
def _row_key(seeds_ptr, positions_ptr, row):
    """``sampling.row_keys`` for one row.  The int64 inputs are masked to 32 bits before the cast, so the cast never
    depends on how a backend truncates out-of-range values."""
    seed = tl.load(seeds_ptr + row)
    position = tl.load(positions_ptr + row)
    lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    seed_key = _mix32(lo ^ _mix32(hi ^ 0x5BD1E995))
    return _mix32(seed_key ^ _mix32((position & 0xFFFFFFFF).to(tl.uint32) ^ 0x165667B1))


@triton.jit
def _uniform(bits):
    """``sampling.uniform_from_bits``, exactly: the top 23 bits k as the float 1 + k / 2**23 (exponent bits set by
    hand, no int-to-float conversion), minus (1 - 2**-24), which is (k + 0.5) / 2**23 with no rounding."""
    one_plus = ((bits >> 9) | 0x3F800000).to(tl.float32, bitcast=True)
    return one_plus - 0.99999994039535522


@triton.jit
def _gumbel(u):
    """-log(-log(u)); where ``tl.log`` and torch's ``log`` agree on every one of the 2**23 uniforms, the kernel's
    noise equals the reference's bit for bit."""
    return -tl.log(-tl.log(u))


# The bound's slack over G = -log(-log(u)); see ``_gumbel_upper``.
_GUMBEL_MARGIN = tl.constexpr(1e-4)
_LN2_OVER_2_23 = tl.constexpr(0.6931471805599453 / 2**23)


@triton.jit
def _gumbel_upper(u):
    """A cheap upper bound on the float32 ``_gumbel(u)`` for the uniforms ``_uniform`` makes: no transcendental.

    Exactly: -log(u) >= 1 - u, so G = -log(-log u) <= -log(t) with t = 1 - u.  t is exact in float32 (it is
    (2**24 - 2k - 1) / 2**24, an odd integer below 2**24 over 2**24).  With t = m * 2**e (m in [1, 2)), log2 is
    concave, so log2(m) >= m - 1, hence -log(t) <= ln2 * (1 - e - m) = ln2 * d / 2**23, where d = 0x3F800000 - bits(t)
    (the bits of t read as an integer are (e + 127) * 2**23 + (m - 1) * 2**23), an integer in (0, 24 * 2**23].

    Margin: ``_gumbel``'s two logs err by an ulp or so each (|G| <= 16.7 since u is in [2**-24, 1 - 2**-24]), which
    moves its float32 result by at most about (1 + |G|) * 2**-23 per ulp of error, 2.2e-6; converting d, the
    rounded constant, the product and adding the margin cost at most about 4 * 2**-24 * 16.7 + 2**-20, 5e-6.  So
    1e-4 covers the rounding by ten times or more, also for logs a few ulps off; the bound is otherwise tight to
    2**-25 near u = 1.  tests/test_sampler_kernel.py checks it against every one of the 2**23 uniforms."""
    d = 0x3F800000 - (1.0 - u).to(tl.int32, bitcast=True)
    return d.to(tl.float32) * _LN2_OVER_2_23 + _GUMBEL_MARGIN


@triton.jit
def _mul(x, y, PTX: tl.constexpr):
    """x * y rounded on its own: the compiler would contract ``x * y + z`` into one FMA, which the torch reference
    (a multiply, then an add) does not do.  PTX's ``mul.rn`` is never contracted; elsewhere (the interpreter) a
    plain product is already rounded on its own."""
    if PTX:
        return tl.inline_asm_elementwise("mul.rn.f32 $0, $1, $2;", "=r,r,r", [x, y], dtype=tl.float32,
                                         is_pure=True, pack=1)
    else:
        return x * y


# Each program walks its contiguous run of BLOCK-wide tiles with a per-lane running best (value, index); the logits
# are read once, and the two precise logs per element are most of the cost, which SKIP avoids for most tiles: after
# k tiles a new one holds a new record with chance about 1 / (k + 1).  SKIP is exact: a skipped tile's every score is
# <= running, so none beats the program's best, and its indices are larger than those of the tile that set running
# (tiles go in increasing order), so the smallest index of the maximum is unchanged; NaN scores are never taken
# either way, and a row of -inf keeps answering its split's start index.  Its code takes more registers a thread.
# The split counts follow the batch size, which changes with every prefill batch: without do_not_specialize
# Triton would JIT-compile a variant (on whether each is 1 or a multiple of 16) inside generate.
@triton.jit(do_not_specialize=["tiles_per_split", "num_splits"])
def _gumbel_argmax_split_kernel(logits_ptr, temperature_ptr, seeds_ptr, positions_ptr, best_val_ptr, best_idx_ptr,
                                stride_row, V, tiles_per_split, num_splits, BLOCK: tl.constexpr, PTX: tl.constexpr,
                                SKIP: tl.constexpr, PDL: tl.constexpr):
    pdl_begin(PDL)
    row = tl.program_id(0)
    split = tl.program_id(1)
    start = split * tiles_per_split * BLOCK
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    offs = tl.arange(0, BLOCK)
    # Lanes that never see a finite score keep index ``start``, so an all -inf row answers 0, as torch.argmax.
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = tl.zeros([BLOCK], tl.int32) + start
    temperature = tl.load(temperature_ptr + row)
    # Tiles go in increasing index order and a lane takes only a strictly larger score, so each lane keeps its
    # smallest index among equal scores.
    if temperature > 0:
        inv_t = tl.math.div_rn(1.0, tl.maximum(temperature.to(tl.float32), 1e-6))
        key = _row_key(seeds_ptr, positions_ptr, row)
        running = tl.full([], float("-inf"), tl.float32)  # == tl.max(best, 0): the best precise score so far
        for tile in range(0, tiles_per_split):  # the last split's last tiles may lie past V: fully masked
            cols = start + tile * BLOCK + offs
            x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            s = _mul(x, tl.broadcast_to(inv_t, [BLOCK]), PTX)
            u = _uniform(_mix32(key ^ cols))
            compute = True
            if SKIP and running > float("-inf"):  # until a finite score is seen, every tile is computed
                # s + _gumbel_upper(u) >= every precise score of its lane (float addition is monotone); a NaN s
                # (whose score is never taken) must not hide the tile from tl.max.
                ub = s + _gumbel_upper(u)
                compute = tl.max(tl.where(ub == ub, ub, float("-inf")), 0) > running
            if compute:
                score = s + _gumbel(u)
                take = score > best
                best = tl.where(take, score, best)
                best_idx = tl.where(take, cols, best_idx)
                if SKIP:
                    running = tl.max(best, 0)
        if SKIP:
            top = running
        else:
            top = tl.max(best, 0)
    else:
        for tile in range(0, tiles_per_split):
            cols = start + tile * BLOCK + offs
            x = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
            take = x > best
            best = tl.where(take, x, best)
            best_idx = tl.where(take, cols, best_idx)
        top = tl.max(best, 0)
    top_idx = tl.min(tl.where(best == top, best_idx, _MAX_INDEX), 0)
    tl.store(best_val_ptr + row * num_splits + split, top)
    tl.store(best_idx_ptr + row * num_splits + split, top_idx)


@triton.jit(do_not_specialize=["num_splits"])
def _gumbel_argmax_pick_kernel(best_val_ptr, best_idx_ptr, out_ptr, num_splits, SPLITS: tl.constexpr,
                               PDL: tl.constexpr):
    pdl_begin(PDL)
    row = tl.program_id(0)
    s = tl.arange(0, SPLITS)
    valid = s < num_splits
    val = tl.load(best_val_ptr + row * num_splits + s, mask=valid, other=float("-inf"))
    idx = tl.load(best_idx_ptr + row * num_splits + s, mask=valid, other=_MAX_INDEX)
    top = tl.max(val, 0)
    tl.store(out_ptr + row, tl.min(tl.where(val == top, idx, _MAX_INDEX), 0).to(tl.int64))


def split_plan(batch: int, vocab: int, device: torch.device, block: int = BLOCK) -> tuple[int, int]:
    """(num_splits, tiles_per_split) from static shapes and the SM count only (graph-capture safe).

    Aims at ``PROGRAMS_PER_SM`` programs per SM, at most one split per tile: on 132 SMs with a 151,936 vocabulary
    (149 tiles) B=1 gets 149 splits of one tile, B=16 50 splits, B=64 17, B=256 5.  No split is empty."""
    tiles = triton.cdiv(vocab, block)
    splits = max(1, min(tiles, triton.cdiv(PROGRAMS_PER_SM * _num_sms(device), batch)))
    tiles_per_split = triton.cdiv(tiles, splits)
    return triton.cdiv(tiles, tiles_per_split), tiles_per_split


def gumbel_argmax_triton(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
                         positions: torch.Tensor, num_splits: int | None = None, block: int = BLOCK,
                         num_warps: int = NUM_WARPS, skip: bool = True) -> torch.Tensor:
    """logits [B, V] (bf16 / fp16 / fp32), temperature f32 [B], seeds and positions i64 [B] -> token ids i64 [B].

    ``num_splits`` overrides the split count (tests, tuning); it is rounded so that no split is empty.  Unlike
    ``torch.argmax``, a NaN score is never chosen.  ``skip=False`` computes the precise noise on every tile (same
    tokens, slower: for A/B timing and tests)."""
    assert logits.dim() == 2, "logits must be [B, V]"
    batch, vocab = logits.shape
    assert 0 < vocab < _INT32_MAX
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(batch, dtype=torch.int64, device=logits.device)
    if batch == 0:
        return out
    if num_splits is None:
        num_splits, tiles_per_split = split_plan(batch, vocab, logits.device, block)
    else:
        tiles = triton.cdiv(vocab, block)
        tiles_per_split = triton.cdiv(tiles, max(1, min(int(num_splits), tiles)))
        num_splits = triton.cdiv(tiles, tiles_per_split)
    best_val = torch.empty(batch, num_splits, dtype=torch.float32, device=logits.device)
    best_idx = torch.empty(batch, num_splits, dtype=torch.int32, device=logits.device)
    temperature = temperature.float().contiguous()
    seeds, positions = seeds.long().contiguous(), positions.long().contiguous()
    _gumbel_argmax_split_kernel[(batch, num_splits)](
        logits, temperature, seeds, positions, best_val, best_idx, logits.stride(0), vocab, tiles_per_split,
        num_splits, BLOCK=block, PTX=logits.is_cuda and torch.version.hip is None, SKIP=skip, num_warps=num_warps,
        **pdl_launch(logits.device))
    _gumbel_argmax_pick_kernel[(batch,)](best_val, best_idx, out, num_splits,
                                         SPLITS=triton.next_power_of_2(num_splits), num_warps=1,
                                         **pdl_launch(logits.device))
    return out


@triton.jit
def _gumbel_noise_kernel(seeds_ptr, positions_ptr, uniform_ptr, noise_ptr, V, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    valid = cols < V
    u = _uniform(_mix32(_row_key(seeds_ptr, positions_ptr, row) ^ cols))
    out = row.to(tl.int64) * V + cols
    tl.store(uniform_ptr + out, u, mask=valid)
    tl.store(noise_ptr + out, _gumbel(u), mask=valid)


def gumbel_noise_triton(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int,
                        block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's (uniform, noise), each [B, V] float32: compare with ``sampling.uniform_from_bits`` and
    ``sampling.gumbel_noise``."""
    batch = seeds.shape[0]
    uniform = torch.empty(batch, vocab_size, dtype=torch.float32, device=seeds.device)
    noise = torch.empty_like(uniform)
    _gumbel_noise_kernel[(batch, triton.cdiv(vocab_size, block))](
        seeds.long().contiguous(), positions.long().contiguous(), uniform, noise, vocab_size, BLOCK=block)
    return uniform, noise


@triton.jit
def _gumbel_bound_kernel(uniform_ptr, noise_ptr, bound_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    u = tl.load(uniform_ptr + offs, mask=offs < N, other=0.5)
    tl.store(noise_ptr + offs, _gumbel(u), mask=offs < N)
    tl.store(bound_ptr + offs, _gumbel_upper(u), mask=offs < N)


def gumbel_bound_triton(uniform: torch.Tensor, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's (``_gumbel``, ``_gumbel_upper``) of float32 uniforms (any shape): a test aid for the skip."""
    uniform = uniform.float().contiguous()
    noise, bound = torch.empty_like(uniform), torch.empty_like(uniform)
    _gumbel_bound_kernel[(triton.cdiv(uniform.numel(), block),)](uniform, noise, bound, uniform.numel(), BLOCK=block)
    return noise, bound
