"""The fused Triton kernels on a GPU, exact against their PyTorch twins (CI runs them only under the Triton
interpreter, whose bf16 casts truncate where a GPU rounds to nearest).  Every output is first poisoned with NaN
(``torch.empty`` is patched), so an element a kernel fails to write fails its check.

* ``store_kv``: bit-exact, padded slots (-1) skipped, key and value strided views of one qkv tensor.
* decode and prefill attention: relative error below 1e-3 (fp32) or 2e-2 (bf16) over head_dim 64/128, GQA groups
  1-8, KV blocks 16/64/256, contexts 0-16k, cached prefixes; a decode launch captured in a CUDA graph and replayed
  with new context lengths.
* ``rope_store``: exact without the q/k norm; with it under 1e-4 of the elements may differ by the norm's rounding.
* matmul: every Triton configuration of this GPU's dispatch table against ``linear_reference`` (relative < 1e-2).
* sampler: the reference's tokens with and without the tile skip; the skip's bound above the noise for all 2**23
  uniforms.
"""
import contextlib
import math

import pytest
import torch

from benchmarks.kernel_bench import make_cache

BF16, FP32 = torch.bfloat16, torch.float32
DEV = "cuda"


def rel_err(out, want) -> float:
    out, want = out.double(), want.double()
    return ((out - want).norm() / want.norm().clamp_min(1e-30)).nan_to_num(math.inf).item()


@contextlib.contextmanager
def poisoned_empty():
    """Every float tensor made by torch.empty starts as NaN, so outputs a kernel fails to write show up."""
    plain = torch.empty

    def empty(*args, **kwargs):
        t = plain(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = plain


def assert_close(dtype, out, want):
    err = rel_err(out, want)
    assert err < (1e-3 if dtype == FP32 else 2e-2), f"relative error {err:.2e}"


@pytest.mark.parametrize("dt, bs, hkv, d", [(BF16, 16, 8, 128), (BF16, 64, 2, 64), (FP32, 256, 4, 128)])
def test_store_kv_is_bit_exact_and_skips_padded_slots(dt, bs, hkv, d):
    from nanovllm.kernels import reference as ref
    from nanovllm.kernels.triton_attention import store_kv_triton
    torch.manual_seed(0)
    num_blocks, tokens = 40, 300
    qkv = torch.randn(tokens, (2 * hkv + 4) * d, dtype=dt, device=DEV)
    key, value = qkv[:, 4 * d:(4 + hkv) * d].view(tokens, hkv, d), qkv[:, (4 + hkv) * d:].view(tokens, hkv, d)
    slots = torch.randperm(num_blocks * bs)[:tokens].to(torch.int32)
    slots[torch.rand(tokens) < 0.15] = -1
    slots = slots.to(DEV)
    k0 = torch.full((num_blocks, hkv, bs, d), float("nan"), dtype=dt, device=DEV)
    v0 = torch.randn_like(k0)
    kt, vt, kr, vr = k0.clone(), v0.clone(), k0.clone(), v0.clone()
    store_kv_triton(key, value, kt, vt, slots)
    ref.store_kv_reference(key, value, kr, vr, slots)
    assert torch.equal(kt.nan_to_num(7.0), kr.nan_to_num(7.0)) and torch.equal(vt, vr)


def _lens(n, hi, seed):
    return torch.randint(1, hi + 1, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("d, group, hkv, bs, dt, ctx", [
    (128, 1, 4, 16, FP32, [0, 1, 15, 16, 17, 1000]),
    (128, 2, 8, 16, BF16, [0 if i % 17 == 0 else c for i, c in enumerate(_lens(256, 2048, 1))]),
    (64, 4, 2, 64, BF16, _lens(29, 4096, 2) + [63, 64, 128]),
    (128, 8, 2, 256, FP32, [16384, 255, 257, 0]),
    (64, 8, 1, 16, FP32, _lens(8, 16384, 3)),
    (128, 4, 4, 64, BF16, [16384]),
    (128, 2, 8, 256, BF16, _lens(64, 4096, 4)),
    (64, 1, 8, 256, BF16, [1, 300, 9000]),
    (128, 2, 4, 64, FP32, _lens(128, 1024, 5)),
])
def test_decode_attention_matches_its_twin(d, group, hkv, bs, dt, ctx):
    from nanovllm.kernels import reference as ref
    from nanovllm.kernels.triton_decode import decode_attention_triton
    torch.manual_seed(0)
    kc, vc, bt, cl = make_cache(ctx, hkv, d, bs, dt)
    q = torch.randn(len(ctx), group * hkv, d, dtype=dt, device=DEV)
    with poisoned_empty():
        out = decode_attention_triton(q, kc, vc, bt, cl, d ** -0.5)
    assert_close(dt, out, ref.decode_attention_reference(q, kc, vc, bt, cl, d ** -0.5))


def test_decode_attention_replayed_in_a_cuda_graph_reads_new_context_lengths():
    from nanovllm.kernels import reference as ref
    from nanovllm.kernels.triton_decode import decode_attention_triton
    torch.manual_seed(0)
    kc, vc, bt, cl = make_cache([1000, 0, 37, 4000], 8, 128, 16, BF16)
    q = torch.randn(4, 16, 128, dtype=BF16, device=DEV)
    decode_attention_triton(q, kc, vc, bt, cl, 0.1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention_triton(q, kc, vc, bt, cl, 0.1)
    cl.copy_(torch.tensor([5, 3999, 0, 1], dtype=torch.int32))
    q.copy_(torch.randn_like(q))
    out.fill_(float("nan"))
    graph.replay()
    assert_close(BF16, out, ref.decode_attention_reference(q, kc, vc, bt, cl, 0.1))


@pytest.mark.parametrize("d, group, hkv, bs, dt, q_lens, prefix", [
    (128, 2, 8, 16, BF16, [1000, 1, 37, 300], [0, 64, 500, 3796]),
    (64, 4, 2, 64, FP32, [5, 128, 64, 200], [0, 0, 17, 1000]),
    (128, 8, 2, 256, BF16, [2048], [3000]),
    (128, 1, 4, 64, FP32, [256, 513], [0, 255]),
    (64, 2, 4, 16, BF16, _lens(16, 299, 6), [n - 1 for n in _lens(16, 2000, 7)]),
    (128, 4, 2, 256, FP32, [1, 1, 1], [0, 16383, 100]),
])
def test_prefill_attention_matches_its_twin(d, group, hkv, bs, dt, q_lens, prefix):
    from nanovllm.kernels import reference as ref
    from nanovllm.kernels.triton_attention import prefill_attention_triton
    torch.manual_seed(0)
    ctx = [a + b for a, b in zip(q_lens, prefix)]
    kc, vc, bt, cl = make_cache(ctx, hkv, d, bs, dt)
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
    q = torch.randn(sum(q_lens), group * hkv, d, dtype=dt, device=DEV)
    with poisoned_empty():
        out = prefill_attention_triton(q, kc, vc, cu, cl, bt, d ** -0.5)
    assert_close(dt, out, ref.prefill_attention_reference(q, kc, vc, cu, cl, bt, d ** -0.5))


@pytest.mark.parametrize("tokens", [256, 4096])
@pytest.mark.parametrize("qk_norm", [True, False])
def test_rope_store_matches_its_twin(tokens, qk_norm):
    from nanovllm.kernels import reference as ref
    from nanovllm.kernels.triton_rope_store import rope_store_kv_triton
    from nanovllm.layers.rotary import RotaryEmbedding
    heads, kv_heads, head_dim, block = 16, 8, 128, 64  # Qwen3-0.6B's heads
    g = torch.Generator(device=DEV).manual_seed(tokens)
    qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=DEV, generator=g) * 3).to(BF16)
    positions = torch.randint(0, 4096, (tokens,), device=DEV, generator=g)
    rotary = RotaryEmbedding(head_dim, 4096, 1e6).to(DEV)
    w = [(torch.rand(head_dim, device=DEV, generator=g) + 0.5).to(BF16) if qk_norm else None for _ in range(2)]
    num_blocks = tokens // block + 2
    slots = torch.randperm(num_blocks * block, device=DEV, generator=g)[:tokens]
    slots[::7] = -1
    caches = [[torch.zeros(num_blocks, kv_heads, block, head_dim, device=DEV, dtype=BF16) for _ in range(2)]
              for _ in range(2)]
    common = (qkv, positions, rotary.cos_cache, rotary.sin_cache, *w, 1e-6)
    want = ref.rope_store_kv_reference(*common, *caches[0], slots, heads, kv_heads)
    with poisoned_empty():
        got = rope_store_kv_triton(*common, *caches[1], slots, heads, kv_heads)
    pairs = [(got, want), (caches[1][0], caches[0][0]), (caches[1][1], caches[0][1])]
    share = sum((a != b).sum().item() for a, b in pairs) / sum(a.numel() for a, _ in pairs)
    assert share < 1e-4 if qk_norm else share == 0, f"share of elements differing: {share:.2e}"


def test_every_tuned_matmul_of_this_gpu_matches_the_reference():
    from benchmarks.kernel_bench import tuned_matmuls
    from nanovllm.kernels import reference as ref
    from nanovllm.kernels.triton_matmul import linear_triton
    torch.manual_seed(0)
    errors = {}
    for key, n_out, k, silu, m, cfg in tuned_matmuls():
        w = torch.randn(2 * n_out if silu else n_out, k, device=DEV, dtype=BF16) / k ** 0.5
        x = torch.randn(m, k, device=DEV, dtype=BF16)
        errors[f"{key} m={m}"] = rel_err(linear_triton(x, w, None, cfg, silu),
                                         ref.linear_reference(x.float(), w.float(), None, silu))
    assert {case: e for case, e in errors.items() if not e < 1e-2} == {}


def test_the_sampler_skip_bound_is_above_the_noise_for_every_uniform():
    from nanovllm.kernels.sampling import uniform_from_bits
    from nanovllm.kernels.triton_sampler import gumbel_bound_triton
    noise, bound = gumbel_bound_triton(uniform_from_bits(torch.arange(2**23, device=DEV) << 9))
    assert (bound < noise).sum().item() == 0


@pytest.mark.parametrize("batch", [2, 8, 64, 256])
def test_the_sampler_draws_the_reference_tokens_with_and_without_its_tile_skip(batch):
    from benchmarks.kernel_bench import sampler_args
    from nanovllm.kernels.sampling import gumbel_argmax_reference
    from nanovllm.kernels.triton_sampler import gumbel_argmax_triton
    args = sampler_args(batch)
    got = gumbel_argmax_triton(*args)
    assert torch.equal(got, gumbel_argmax_reference(*args))
    assert torch.equal(got, gumbel_argmax_triton(*args, skip=False))
