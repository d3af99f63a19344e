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
    bits = sampler._mix32(sampler.row_keys(seeds, positions)[:, None] ^ torch.arange(vocab)[None, :])
    assert torch.equal(uniform, sampler.uniform_from_bits(bits))  # bit for bit
    assert (uniform > 0).all() and (uniform < 1).all()
    want = sampler.gumbel_noise(seeds, positions, vocab)
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
    assert torch.equal(got, sampler.gumbel_argmax_reference(logits, temperature, seeds, positions))
    greedy = temperature == 0
    assert torch.equal(got[greedy], logits.float().argmax(-1)[greedy])


def test_sampled_rows_depend_on_the_noise():
    """Flat logits: greedy rows answer 0, sampled rows spread over the vocabulary as their seeds say."""
    logits = torch.zeros(8, 1000)
    temperature = torch.tensor([0.0, 1, 1, 1, 1, 1, 1, 1])
    got = ts.gumbel_argmax_triton(logits, temperature, torch.arange(8), torch.zeros(8, dtype=torch.long))
    assert got[0] == 0 and len(set(got[1:].tolist())) > 4
    assert torch.equal(got, sampler.gumbel_argmax_reference(logits, temperature, torch.arange(8),
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
