"""The fused q/k-norm + rope + KV-store kernel (nanovllm/kernels/triton_rope_store.py) against the model's torch
code (``reference.rope_store_kv_reference``), on CPU under the Triton interpreter."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from nanovllm.kernels.reference import rope_store_kv_reference  # noqa: E402
from nanovllm.kernels.triton_rope_store import rope_store_kv_triton  # noqa: E402
from nanovllm.layers.rotary import RotaryEmbedding  # noqa: E402


def make_case(dtype, num_heads, num_kv_heads, head_dim, qk_norm, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens, block_size, num_blocks = 7, 4, 6
    qkv = (torch.randn(tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=g) * 2).to(dtype)
    positions = torch.tensor([0, 1, 5, 9, 30, 31, 2])
    rotary = RotaryEmbedding(head_dim, 64, 10000.0)
    weights = [(torch.rand(head_dim, generator=g) + 0.5).to(dtype) for _ in range(2)] if qk_norm else [None, None]
    slots = torch.tensor([3, 0, -1, 9, 22, 17, -1])  # -1: padding rows, written nowhere
    caches = [torch.zeros(num_blocks, num_kv_heads, block_size, head_dim, dtype=dtype) for _ in range(2)]
    return (qkv, positions, rotary.cos_cache, rotary.sin_cache, *weights, 1e-6, *caches, slots, num_heads,
            num_kv_heads)


@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("heads", [(4, 2, 32), (6, 2, 16), (3, 3, 8)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_the_model_code(dtype, heads, qk_norm):
    args = make_case(dtype, *heads, qk_norm)
    want_caches = [c.clone() for c in args[7:9]]
    want_q = rope_store_kv_reference(*args[:7], *want_caches, *args[9:])
    got_q = rope_store_kv_triton(*args)
    got_caches = args[7:9]
    tol = dict(rtol=1e-6, atol=1e-6)
    if dtype == torch.bfloat16:  # rope alone is exact; with the norm, its float32 sum (in another order) may
        tol = dict(rtol=2 ** -7, atol=1e-6) if qk_norm else dict(rtol=0, atol=0)  # round one ulp the other way
    torch.testing.assert_close(got_q, want_q, **tol)
    for got, want in zip(got_caches, want_caches):
        torch.testing.assert_close(got, want, **tol)
    assert want_caches[0].abs().sum() > 0, "the case stores something"
    # Padding rows (slot -1) left the cache untouched: only the 5 valid slots hold data.
    written = got_caches[1].permute(0, 2, 1, 3).reshape(-1, heads[1] * heads[2]).abs().sum(-1) > 0
    assert written.nonzero().flatten().tolist() == [0, 3, 9, 17, 22]
