"""bf16 experts as two grouped GEMMs (``grouped_moe.experts_grouped``) against the twin (``moe_reference``), on CPU:
``torch._grouped_mm``'s loop and the activation kernel under the Triton interpreter.  Covered: every activation,
``round_weights``, experts that get no pair, ``experts_triton`` handing experts over, and where it does
(``grouped_usable``: sm90, the lab's widths and rows).  Float32 checks the sorting, gathering and weighting
tightly; bf16 the production dtype."""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from nanovllm.kernels import grouped_moe  # noqa: E402
from nanovllm.kernels import moe_reference as ref  # noqa: E402
from nanovllm.kernels.triton_moe_align import chunk_histogram  # noqa: E402
from moe_kernel_cases import EXPERTS, HIDDEN, INTER, TOP_K, rel_err  # noqa: E402

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


def experts(dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w13 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=gen) / HIDDEN ** 0.5
    w2 = torch.randn(EXPERTS, HIDDEN, INTER, generator=gen) / INTER ** 0.5
    return w13.to(dtype), w2.to(dtype)


@pytest.mark.parametrize("activation", ["silu", "swiglu_oss", "gelu_tanh"])
@pytest.mark.parametrize("num_tokens", [1, 9, 40])
def test_grouped_experts_match_the_twin(num_tokens, activation):
    gen = torch.Generator().manual_seed(num_tokens)
    ids = torch.randint(0, EXPERTS - 2, (num_tokens, TOP_K), generator=gen, dtype=torch.int32)  # the last 2: none
    ids[0] = torch.tensor([3, 1], dtype=torch.int32)  # token 0 ahead of later tokens on expert 1 once sorted
    weights = torch.rand(num_tokens, TOP_K, generator=gen)
    x = torch.randn(num_tokens, HIDDEN, generator=gen)
    hist = chunk_histogram(ids, EXPERTS)
    for dtype in (torch.float32, torch.bfloat16):
        w13, w2 = experts(dtype, seed=num_tokens)
        for round_weights in (False, True):
            kw = dict(activation=activation, round_weights=round_weights)
            got = grouped_moe.experts_grouped(x.to(dtype), weights, ids, hist, w13, w2, **kw)
            want = ref.experts_reference(x.to(dtype), weights, ids, w13, w2, **kw)
            assert got.dtype == dtype and got.shape == x.shape
            err = rel_err(got, want)
            assert err < TOLERANCE[dtype], f"{dtype} round_weights={round_weights}: relative error {err:.2e}"


def meta_experts(e, h, i, tokens, dtype=torch.bfloat16):
    """x, w13, w2 of these sizes with no storage (``grouped_usable`` reads shapes, strides and dtypes only)."""
    return (torch.empty(tokens, h, dtype=dtype, device="meta"), torch.empty(e, 2 * i, h, dtype=dtype, device="meta"),
            torch.empty(e, h, i, dtype=dtype, device="meta"))


def test_grouped_experts_are_taken_where_the_lab_measured_them_faster(monkeypatch):
    w13, w2 = experts(torch.bfloat16)
    x = torch.empty(4096, HIDDEN, dtype=torch.bfloat16)
    assert not grouped_moe.grouped_usable(x, TOP_K, w13, w2, False)  # CPU: torch's loop copies to the host
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    monkeypatch.setattr(grouped_moe, "device_capability", lambda dev: (9, 0))
    usable = grouped_moe.grouped_usable
    # Mixtral (8 experts of 14,336, top 2) from 512 mean rows (2,048 tokens); 4,096 and 2,560 columns from 1,024
    for e, h, i, top_k, tokens, taken in ((8, 4096, 14336, 2, 2048, True), (8, 4096, 14336, 2, 2047, False),
                                          (8, 4096, 4096, 2, 2048, False),
                                          (8, 4096, 4096, 2, 4096, True), (64, 3584, 2560, 8, 4096, False),
                                          (64, 3584, 2560, 8, 8192, True), (128, 2048, 768, 8, 16384, False)):
        x, w13, w2 = meta_experts(e, h, i, tokens)
        assert usable(x, top_k, w13, w2, False) == taken, (e, h, i, tokens)
    x, w13, w2 = meta_experts(8, 4096, 14336, 4096)
    for dtype in (torch.float8_e4m3fn, torch.uint8):  # quantized: FP8, int4 / MXFP4 codes
        assert not usable(x, 2, w13.to(dtype), w2.to(dtype), False), dtype
    assert not usable(x, 2, w13, w2, True)  # biased
    half = meta_experts(8, 4096, 14336, 4096, torch.float16)
    assert not usable(half[0], 2, half[1], half[2], False)  # fp16: torch's loop
    assert not usable(x, 2, w13, w2.transpose(1, 2).contiguous().transpose(1, 2), False)  # w2 transposed
    odd = meta_experts(8, 4096, 14340, 4096)
    assert not usable(odd[0], 2, odd[1], odd[2], False)  # 14,340 columns: rows not 16-byte multiples
    for capability in ((10, 0), (8, 9)):  # crossovers not measured there
        monkeypatch.setattr(grouped_moe, "device_capability", lambda dev, c=capability: c)
        assert not usable(x, 2, w13, w2, False), capability


def test_experts_triton_hands_usable_experts_over(monkeypatch):
    from nanovllm.kernels import triton_moe
    w13, w2 = experts(torch.bfloat16)
    gen = torch.Generator().manual_seed(5)
    ids = torch.randint(0, EXPERTS, (12, TOP_K), generator=gen, dtype=torch.int32)
    weights, x = torch.rand(12, TOP_K, generator=gen), torch.randn(12, HIDDEN, generator=gen).bfloat16()
    calls = []
    monkeypatch.setattr(triton_moe, "grouped_usable", lambda *a: True)
    real = grouped_moe.experts_grouped
    monkeypatch.setattr(triton_moe, "experts_grouped", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = triton_moe.moe_plan(x, TOP_K, w13, w2, None, None, 0, None)[0]
    got = triton_moe.experts_triton(x, weights, ids, chunk_histogram(ids, EXPERTS), w13, w2, cfg)
    assert calls == [1]
    assert rel_err(got, ref.experts_reference(x, weights, ids, w13, w2)) < TOLERANCE[torch.bfloat16]
    triton_moe.experts_triton(x, weights, ids, chunk_histogram(ids, EXPERTS), w13, w2, cfg, grouped=False)
    logits = torch.randn(12, EXPERTS, generator=gen)
    triton_moe.fused_moe_triton(x, logits, w13, w2, TOP_K, True, cfg=cfg)  # given tiles run as given
    assert calls == [1]
    triton_moe.fused_moe_triton(x, logits, w13, w2, TOP_K, True)
    assert calls == [1, 1]
