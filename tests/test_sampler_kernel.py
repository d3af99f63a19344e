"""The fused Gumbel-max sampling kernel against the torch reference, on CPU under the Triton interpreter.

The kernel (nanovllm/kernels/triton_sampler.py) runs here with TRITON_INTERPRET=1 on CPU tensors.  Its hash and
uniforms must equal the reference's bit for bit; its tokens must equal the reference's (the interpreter's log is
numpy's, which differs from torch's by an ulp at times: the inputs here have no near-ties that small).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from nanovllm.kernels import sampling  # noqa: E402
from nanovllm.kernels import triton_sampler as ts  # noqa: E402
from nanovllm.layers import sampler  # noqa: E402

# Seeds over the whole int64 range (both halves and the sign bit matter) and positions past 2**32.
SEEDS = [0, -1, 2**63 - 1, -2**63, 0x123456789ABCDEF0, 7, 7, 2**32]
POSITIONS = [0, 1, 2**40 + 5, 3, 100_000, 2**31, 2**32 - 1, 4]


def rows(batch, vocab, dtype, seed=0):
    """Random logits [B, V] with greedy (T = 0) and sampling rows mixed, seeds and positions from the lists above."""
    gen = torch.Generator().manual_seed(seed + 1000 * batch + vocab)
    logits = (torch.randn(batch, vocab, generator=gen) * 2).to(dtype)
    temperature = torch.tensor([0.0, 1.0, 0.7, 1.5, 0.0, 0.05, 1.0, 2.0][:batch])
    return logits, temperature, torch.tensor(SEEDS[:batch]), torch.tensor(POSITIONS[:batch])


@pytest.mark.parametrize("vocab", [1000, 5003])
def test_uniforms_and_noise_match_the_torch_hash(vocab):
    seeds, positions = torch.tensor(SEEDS), torch.tensor(POSITIONS)
    uniform, noise = ts.gumbel_noise_triton(seeds, positions, vocab)
    bits = sampling.mix32(sampling.row_keys(seeds, positions)[:, None] ^ torch.arange(vocab)[None, :])
    assert torch.equal(uniform, sampling.uniform_from_bits(bits))  # bit for bit
    assert (uniform > 0).all() and (uniform < 1).all()
    want = sampling.gumbel_noise(seeds, positions, vocab)
    assert torch.isfinite(noise).all()
    torch.testing.assert_close(noise, want, rtol=1e-6, atol=1e-6)  # numpy's log against torch's: an ulp or so
    assert not torch.equal(noise[5], noise[6])  # same seed, other position
    alone = ts.gumbel_noise_triton(seeds[5:6], positions[5:6], vocab)[1][0]
    assert torch.equal(alone, noise[5])  # a row's noise does not depend on its batch


@pytest.mark.parametrize("batch,vocab", [(1, 1000), (3, 5003), (8, 1000), (8, 5003)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tokens_match_the_reference(batch, vocab, dtype):
    logits, temperature, seeds, positions = rows(batch, vocab, dtype)
    got = ts.gumbel_argmax_triton(logits, temperature, seeds, positions)
    assert got.dtype == torch.int64 and got.shape == (batch,)
    assert torch.equal(got, sampling.gumbel_argmax_reference(logits, temperature, seeds, positions))
    greedy = temperature == 0
    assert torch.equal(got[greedy], logits.float().argmax(-1)[greedy])


def test_sampled_rows_depend_on_the_noise():
    """Flat logits: greedy rows answer 0, sampled rows spread over the vocabulary as their seeds say."""
    logits = torch.zeros(8, 1000)
    temperature = torch.tensor([0.0, 1, 1, 1, 1, 1, 1, 1])
    got = ts.gumbel_argmax_triton(logits, temperature, torch.arange(8), torch.zeros(8, dtype=torch.long))
    assert got[0] == 0 and len(set(got[1:].tolist())) > 4
    assert torch.equal(got, sampling.gumbel_argmax_reference(logits, temperature, torch.arange(8),
                                                            torch.zeros(8, dtype=torch.long)))


def test_ties_go_to_the_smallest_index():
    logits = torch.full((4, 5003), -3.0, dtype=torch.bfloat16)
    logits[:, [4000, 17, 2500, 5002]] = 5.0  # the maximum four times, in different tiles and splits
    logits[3] = float("-inf")  # torch.argmax answers 0 for a row of -inf
    zero = torch.zeros(4)
    for splits in (None, 1, 2, 5):
        got = ts.gumbel_argmax_triton(logits, zero, torch.arange(4), torch.arange(4), num_splits=splits)
        assert got.tolist() == [17, 17, 17, 0]
    assert torch.equal(got, logits.float().argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tokens_do_not_depend_on_the_split_count(dtype):
    logits, temperature, seeds, positions = rows(8, 5003, dtype, seed=1)
    want = ts.gumbel_argmax_triton(logits, temperature, seeds, positions)
    assert ts.split_plan(8, 5003, logits.device)[0] > 1  # the default really splits
    for splits in (1, 2, 3, 5):
        assert torch.equal(ts.gumbel_argmax_triton(logits, temperature, seeds, positions, num_splits=splits), want)
    # a smaller tile: many tiles per split, the last one partial
    assert torch.equal(ts.gumbel_argmax_triton(logits, temperature, seeds, positions, num_splits=3, block=256), want)


def test_split_plan_is_static_and_covers_the_vocabulary():
    cpu = torch.device("cpu")  # _num_sms answers a fixed 8 off GPU
    for batch in (1, 2, 8, 16, 256):
        for vocab in (1000, 5003, 151_936):
            splits, tiles_per_split = ts.split_plan(batch, vocab, cpu)
            tiles = -(-vocab // ts.BLOCK)
            # no split is empty and together they cover every tile
            assert 1 <= splits <= tiles and (splits - 1) * tiles_per_split < tiles <= splits * tiles_per_split
    assert ts.split_plan(1, 151_936, cpu)[0] > ts.split_plan(16, 151_936, cpu)[0] > ts.split_plan(256, 151_936, cpu)[0]


def test_op_uses_the_reference_off_gpu_and_matches_the_kernel():
    logits, temperature, seeds, positions = rows(8, 1000, torch.bfloat16, seed=2)
    via_op = torch.ops.nanovllm.gumbel_argmax(logits, temperature, seeds, positions)
    via_sample = sampler.sample(logits, temperature, torch.full((8,), -1), torch.ones(8), seeds, positions)
    kernel = ts.gumbel_argmax_triton(logits, temperature, seeds, positions)
    assert torch.equal(via_op, kernel) and torch.equal(via_sample, kernel)


# The skip (``skip=True``, the default): tiles whose bound cannot beat the program's best skip the precise logs.
# It must give exactly the tokens of ``skip=False``.
INF = float("inf")


def nan_as_never_chosen(logits):
    """The reference's input for the kernel's NaN rule: torch.argmax picks a NaN, the kernel never does."""
    return torch.where(logits.isnan(), -INF, logits.float())


def both(logits, temperature, seeds, positions, **kwargs):
    """(skip, no skip) tokens; the caller checks them against each other and the reference."""
    got = ts.gumbel_argmax_triton(logits, temperature, seeds, positions, skip=True, **kwargs)
    plain = ts.gumbel_argmax_triton(logits, temperature, seeds, positions, skip=False, **kwargs)
    return got, plain


@pytest.mark.parametrize("batch,vocab", [(1, 1000), (3, 5003), (8, 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("splits", [1, 2, 5])
@pytest.mark.slow
def test_skip_gives_the_tokens_of_no_skip_and_the_reference(batch, vocab, dtype, splits):
    logits, temperature, seeds, positions = rows(batch, vocab, dtype, seed=3)
    want = sampling.gumbel_argmax_reference(logits, temperature, seeds, positions)
    # BLOCK 128: 2 to 40 tiles per split, the last one partial where V is not a multiple (the tests above run the
    # default BLOCK)
    got, plain = both(logits, temperature, seeds, positions, num_splits=splits, block=128)
    assert torch.equal(got, plain) and torch.equal(got, want)


def test_the_bound_covers_every_uniform():
    """For each of the 2**23 uniforms the kernel can draw, its bound is >= its own noise and torch's (the formula
    of ``sampling.gumbel_noise``), and the bound without its margin is >= the exact G (float64)."""
    bits = torch.arange(2**23, dtype=torch.int64) << 9
    u = sampling.uniform_from_bits(bits)
    noise, bound = ts.gumbel_bound_triton(u, block=65536)  # few programs: the interpreter is slow per program
    torch_noise = -torch.log(-torch.log(u))  # sampling.gumbel_noise's float32 noise of u
    torch.testing.assert_close(noise, torch_noise, rtol=1e-6, atol=1e-6)
    assert (bound >= noise).all() and (bound >= torch_noise).all()
    # The margin only pays for rounding: the bound's exact value, as _gumbel_upper writes it, is above G already.
    d = 0x3F800000 - (1.0 - u).view(torch.int32).double()
    exact_g = -torch.log(-torch.log(u.double()))
    assert (d * (0.6931471805599453 / 2**23) >= exact_g).all()
    # ... and close where the noise is large (the chord under log2 on [1, 2] is at most 0.0861 below it).
    assert (bound - torch_noise)[u > 0.99].max() < 0.063 + 1e-4


def tiles_computed(logits, temperature, seed, position, block):
    """How many tiles of one row the skip computes precisely with one split (the kernel's rule, in torch)."""
    uniform, noise = ts.gumbel_noise_triton(torch.tensor([seed]), torch.tensor([position]), logits.shape[0])
    s = logits.float() * sampling.inverse_temperature(torch.tensor([temperature]))
    ub, score = s + ts.gumbel_bound_triton(uniform[0])[1], s + noise[0]
    running, computed = -INF, 0
    for tile in range(0, logits.shape[0], block):
        if running == -INF or ub[tile:tile + block].nan_to_num(-INF, INF).max() > running:
            computed += 1
            running = max(running, score[tile:tile + block].nan_to_num(-INF, INF).max().item())
    return computed


def test_most_tiles_are_skipped():
    logits = torch.randn(16384, generator=torch.Generator().manual_seed(5)) * 2
    assert tiles_computed(logits, 1.0, 11, 3, 256) <= 16  # of 64 (about ln 64 + 1 expected)


@pytest.mark.slow
def test_skip_adversarial_rows():
    vocab, block = 2000, 256  # 8 tiles, the last one partial; 8 or 3 tiles per split below
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(12, vocab, generator=gen)
    logits[0, vocab - 1] = 30.0  # the winner in the very last (partial) tile
    logits[1] = torch.arange(vocab) * 0.05  # a ramp: every tile a new record, the winner in the last tile
    logits[2, torch.rand(vocab, generator=gen) < 0.3] = float("nan")
    logits[3, torch.rand(vocab, generator=gen) < 0.5] = -INF
    logits[3, torch.rand(vocab, generator=gen) < 0.2] = float("nan")
    logits[4] = -INF  # answers 0, as torch.argmax
    logits[5] = float("nan")  # never a NaN: answers 0 too
    logits[6, :1024] = float("nan")  # the first tiles are NaN, a finite winner later
    logits[7] = -3.0
    logits[7, [1900, 300, 1000, 300 + block]] = 1e4  # T = 1e-6 absorbs the noise: exact ties, 300 must win
    logits[8] = logits[7]
    logits[9] = torch.randn(vocab, generator=gen) * 1e4  # large logits
    logits[10] = torch.randn(vocab, generator=gen)  # tiny temperature: greedy in effect, the noise only breaks ties
    logits[11, 5] = INF  # +inf wins at its smallest index
    logits[11, 1500] = INF
    temperature = torch.tensor([1.0, 1.0, 1.0, 0.8, 1.0, 1.0, 1.0, 1e-6, 1e-9, 1.0, 1e-3, 1.0])
    seeds, positions = torch.arange(12) * 977, torch.arange(12) + 2**33
    want = sampling.gumbel_argmax_reference(nan_as_never_chosen(logits), temperature, seeds, positions)
    for dtype in (torch.float32, torch.bfloat16):
        x = logits.to(dtype)
        for splits in (1, 3):
            got, plain = both(x, temperature, seeds, positions, num_splits=splits, block=block)
            assert torch.equal(got, plain), (dtype, splits)
            if dtype == torch.float32:
                assert torch.equal(got, want), splits
                assert got[[0, 4, 5, 7, 8, 11]].tolist() == [vocab - 1, 0, 0, 300, 300, 5]
                assert not logits[torch.arange(12), got][torch.arange(12) != 5].isnan().any()
