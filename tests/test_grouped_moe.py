"""bf16 experts as two grouped GEMMs (``grouped_moe.experts_grouped``) against the twin (``moe_reference``), on CPU:
``torch._grouped_mm``'s loop and the activation kernel under the Triton interpreter.  Covered: every activation,
``round_weights``, experts that get no pair, and ``experts_triton`` handing such experts over only on sm90/sm100 GPUs
(``grouped_usable``).  Float32 checks the sorting, gathering and weighting tightly; bf16 the production dtype."""
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


def test_grouped_experts_are_taken_only_where_cutlass_runs_them(monkeypatch):
    w13, w2 = experts(torch.bfloat16)
    many = grouped_moe.GROUPED_MIN_ROWS * EXPERTS // TOP_K  # tokens for GROUPED_MIN_ROWS mean pairs per expert
    x = torch.empty(many, HIDDEN, dtype=torch.bfloat16)
    monkeypatch.setattr(grouped_moe, "GROUPED_MIN_INTER", INTER)
    assert not grouped_moe.grouped_usable(x, TOP_K, w13, w2, False, False)  # CPU: torch's loop syncs the host
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    for capability, taken in (((9, 0), True), ((10, 0), True), ((8, 9), False)):
        monkeypatch.setattr(grouped_moe, "device_capability", lambda dev, c=capability: c)
        assert grouped_moe.grouped_usable(x, TOP_K, w13, w2, False, False) == taken, capability
    monkeypatch.setattr(grouped_moe, "device_capability", lambda dev: (9, 0))
    assert not grouped_moe.grouped_usable(x[:many - 1], TOP_K, w13, w2, False, False)  # under the mean
    monkeypatch.setattr(grouped_moe, "GROUPED_MIN_INTER", INTER + 1)
    assert not grouped_moe.grouped_usable(x, TOP_K, w13, w2, False, False)  # small experts: the Triton tiles
    monkeypatch.setattr(grouped_moe, "GROUPED_MIN_INTER", INTER)
    assert not grouped_moe.grouped_usable(x, TOP_K, w13, w2, True, False)  # quantized
    assert not grouped_moe.grouped_usable(x, TOP_K, w13, w2, False, True)  # biased
    assert not grouped_moe.grouped_usable(x.half(), TOP_K, w13.half(), w2.half(), False, False)  # fp16: torch's loop
    t2 = w2.transpose(1, 2).contiguous().transpose(1, 2)
    assert not grouped_moe.grouped_usable(x, TOP_K, w13, t2, False, False)  # w2 as a transposed view


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
