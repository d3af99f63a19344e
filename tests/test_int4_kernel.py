"""The w4a16 Triton projection (nanovllm/kernels/triton_w4a16.py) against its twin
``reference.linear_int4_reference`` on CPU under the Triton interpreter, the twin against a hand computation,
the tile chooser, and the CUDA dispatch of ``nanovllm::linear_int4`` (``cuda._linear_int4``, called on CPU tensors).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from nanovllm.kernels import int4_quant, ops, reference  # noqa: E402
from nanovllm.kernels.matmul_configs import MatmulConfig  # noqa: E402
from nanovllm.kernels.options import KernelOptions, set_options  # noqa: E402
from nanovllm.kernels.triton_w4a16 import (W4A16_TRITON_MAX_M, choose_w4a16, dequantize_int4_triton,  # noqa: E402
                                           fits, linear_w4a16_triton, w4a16_config)

CONFIGS = [MatmulConfig(16, 32, 32), MatmulConfig(32, 16, 16, split_k=2)]


def int4_weight(n, k, group, seed=0):
    """An asymmetric int4 weight [n, k] whose rows and columns differ in scale (a per-row or per-group scale or zero
    mix-up shows)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) / 8 + 0.02
    w *= torch.logspace(-1, 1, n)[:, None] * torch.linspace(0.2, 5, k)[None, :]
    return int4_quant.quantize(w, group, sym=False)


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def test_twin_is_the_hand_computed_product():
    # Codes row 0: 1 15 0 8, row 1: 3 4 5 6; K = 4 in groups of 3: columns 0-2, then a partial group of column 3.
    qweight = torch.tensor([[0xF1, 0x80], [0x43, 0x65]], dtype=torch.uint8)
    scale = torch.tensor([[0.5, 2.0], [1.0, 0.25]], dtype=torch.float16)
    zero = torch.tensor([[8, 0], [4, 6]], dtype=torch.uint8)
    # W row 0: (1-8)/2, (15-8)/2, (0-8)/2, (8-0)*2 = -3.5, 3.5, -4, 16; row 1: -1, 0, 1, (6-6)/4 = 0
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    y = reference.linear_int4_reference(x, qweight, scale, zero, 3)
    assert y.tolist() == [[-3.5 + 7 - 12 + 64, -1 + 0 + 3 + 0]]
    bias = torch.tensor([0.5, -0.25])
    assert reference.linear_int4_reference(x, qweight, scale, zero, 3, bias=bias).tolist() == [[56.0, 1.75]]
    perm = torch.tensor([3, 2, 1, 0], dtype=torch.int32)  # x[:, perm] = 4 3 2 1
    assert reference.linear_int4_reference(x, qweight, scale, zero, 3, perm).tolist() == [[-14 + 10.5 - 8 + 16,
                                                                                          -4 + 0 + 2 + 0]]
    fused = reference.linear_int4_reference(x, qweight, scale, zero, 3, silu_mul=True)  # gate row 0, up row 1
    assert torch.allclose(fused, torch.nn.functional.silu(torch.tensor([[55.5]])) * 2.0)


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("k,group", [(128, 32), (128, 128), (96, 64)])  # four groups, one group, a partial last
@pytest.mark.parametrize("silu_mul", [False, True])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_w4a16_kernel_matches_twin(cfg, k, group, silu_mul, m):
    n = 80  # N_OUT = 80 (or 40 with silu_mul): a partial last column block
    qweight, scale, zero = int4_weight(n, k, group, seed=m)
    gen = torch.Generator().manual_seed(k + m)
    x, b = torch.randn(m, k, generator=gen), torch.randn(n, generator=gen)
    perm = torch.randperm(k, generator=gen).to(torch.int32)
    cases = ((torch.bfloat16, None, None), (torch.float16, b, perm), (torch.float32, b, None))
    for dtype, bias, p in cases:
        xd, bd = x.to(dtype), None if bias is None else bias.to(dtype)
        got = linear_w4a16_triton(xd, qweight, scale, zero, group, p, bd, cfg, silu_mul)
        want = reference.linear_int4_reference(xd, qweight, scale, zero, group, p, bd, silu_mul)
        assert got.dtype == dtype and got.shape == want.shape == (m, n // 2 if silu_mul else n)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        assert rel_err(got, want) < tol, f"{dtype} bias={bias is not None} perm={p is not None}: relative error"
        if p is not None:  # the op multiplies x's columns in perm's order
            assert torch.equal(want, reference.linear_int4_reference(xd[:, p.long()], qweight, scale, zero, group,
                                                                     None, bd, silu_mul))


def test_tile_straddling_two_groups_is_refused():
    qweight, scale, zero = int4_weight(32, 128, 32)
    x = torch.randn(2, 128, dtype=torch.bfloat16)
    with pytest.raises(AssertionError, match="BLOCK_K=64 must divide group=32"):
        linear_w4a16_triton(x, qweight, scale, zero, 32, None, None, MatmulConfig(16, 32, 64))
    assert fits(MatmulConfig(16, 32, 64), 64, 96)  # one group covers all of K: any BLOCK_K
    assert not fits(MatmulConfig(16, 32, 32, split_k=2), 96, 32)  # 96 columns are not two whole splits of 32


def test_dequantize_triton_is_the_formats_dequantize():
    for k, group in ((128, 128), (96, 64), (10, 3)):  # one group, a partial last group, groups of odd width
        qweight, scale, zero = int4_weight(23, k, group)  # 23 rows: the last 4-row tile is partial
        for dtype in (torch.float32, torch.float16):
            assert torch.equal(dequantize_int4_triton(qweight, scale, zero, group, dtype),
                               int4_quant.dequantize(qweight, scale, zero, group, dtype))
        # the interpreter rounds fp32 to bf16 by truncation (the GPU to nearest): equal within one bf16 step
        torch.testing.assert_close(dequantize_int4_triton(qweight, scale, zero, group, torch.bfloat16),
                                   int4_quant.dequantize(qweight, scale, zero, group, torch.bfloat16),
                                   rtol=2 ** -7, atol=0)


def test_w4a16_config_by_rows_split_and_group():
    # at most 16 rows: split until 2 programs per SM, above it 1 (the H100 sweep's rule on the Qwen3-8B shapes)
    assert w4a16_config(1, 12288, 4096, 128, 132) == MatmulConfig(16, 64, 128, split_k=2)  # gate/up: 192 blocks
    assert w4a16_config(1, 6144, 4096, 128, 132) == MatmulConfig(16, 64, 128, split_k=4)  # qkv: 96 blocks
    assert w4a16_config(16, 4096, 12288, 128, 132) == MatmulConfig(16, 64, 128, split_k=8)  # down: 64 blocks
    assert w4a16_config(1, 1024, 4096, 128, 132) == MatmulConfig(16, 64, 128, split_k=16)  # 16 blocks
    assert w4a16_config(20, 4096, 4096, 128, 132) == MatmulConfig(32, 128, 128, split_k=8, num_stages=2)
    assert w4a16_config(64, 8192, 4096, 128, 132) == MatmulConfig(64, 128, 128, split_k=4, num_stages=2)  # 64
    assert w4a16_config(1, 4096, 4096, 32, 132).block_k == 32  # BLOCK_K divides the group
    # groups of 32: the 16-row tile at 64 rows too (Triton cannot compile 64x128x32 on an H100)
    assert w4a16_config(64, 4096, 4096, 32, 132) == MatmulConfig(16, 64, 32, split_k=1)
    assert w4a16_config(1, 4096, 96, 64, 132) == MatmulConfig(16, 64, 32, split_k=1)  # the partial group's tiles
    assert w4a16_config(1, 4096, 4096, 4096, 132).block_k == 128  # one group
    assert w4a16_config(1, 4096, 1000, 128, 132) is None  # K = 1000: no whole BLOCK_K steps


def test_choose_w4a16_leaves_fp32_and_prefill_to_others(restore_options):
    qweight = torch.empty(2048, 512, dtype=torch.uint8)
    assert choose_w4a16(torch.empty(4, 1024, dtype=torch.bfloat16), qweight, False, 128).block_m == 16
    assert choose_w4a16(torch.empty(4, 1024), qweight, False, 128) is None
    assert choose_w4a16(torch.empty(W4A16_TRITON_MAX_M + 1, 1024, dtype=torch.float16), qweight, True, 128) is None
    set_options(KernelOptions(triton_matmul=False))
    assert choose_w4a16(torch.empty(4, 1024, dtype=torch.bfloat16), qweight, False, 128) is None


@pytest.mark.parametrize("m", [3, 17, W4A16_TRITON_MAX_M + 1])
@pytest.mark.parametrize("silu_mul", [False, True])
def test_cuda_linear_int4_dispatch_matches_twin(monkeypatch, restore_options, m, silu_mul):
    """``cuda._linear_int4`` runs the kernel at small M, dequantize + F.linear past W4A16_TRITON_MAX_M (F.linear
    alone on a kept dequantized copy, from KEPT_COPY_FROM rows: bit for bit dequantize + F.linear), and the twin for
    float32 activations or reference kernels, all agreeing with the twin."""
    from nanovllm.kernels import cuda
    calls = []
    for name in ("linear_w4a16_triton", "dequantize_int4_triton"):
        def spy(*args, _name=name, _fn=getattr(cuda, name)):
            calls.append(_name)
            return _fn(*args)
        monkeypatch.setattr(cuda, name, spy)
    k, n, group = 64, 32, 32
    qweight, scale, zero = int4_weight(n, k, group)
    x, b = torch.randn(m, k), torch.randn(n)
    perm = torch.randperm(k).to(torch.int32)
    xb, bb = x.to(torch.bfloat16), b.to(torch.bfloat16)
    want = reference.linear_int4_reference(xb, qweight, scale, zero, group, perm, bb, silu_mul)
    got = cuda._linear_int4(xb, qweight, scale, zero, group, perm, bb, silu_mul, None)
    assert calls == (["linear_w4a16_triton"] if m <= W4A16_TRITON_MAX_M else ["dequantize_int4_triton"])
    assert got.dtype == torch.bfloat16 and rel_err(got, want) < 2e-2
    calls.clear()  # with the dequantized copy kept (quant/dequantized.py): cuBLAS takes it from KEPT_COPY_FROM rows
    kept = dequantize_int4_triton(qweight, scale, zero, group, torch.bfloat16)  # on the GPU int4_quant's (tests/gpu)
    again = cuda._linear_int4(xb, qweight, scale, zero, group, perm, bb, silu_mul, kept)
    assert 3 < cuda.KEPT_COPY_FROM <= 17 <= W4A16_TRITON_MAX_M  # the cases: before it, past it in the kernel's rows
    assert calls == (["linear_w4a16_triton"] if m < cuda.KEPT_COPY_FROM else [])
    set_options(KernelOptions(triton_matmul=False))  # dequantize + F.linear at every M: what the copy must equal
    plain = cuda._linear_int4(xb, qweight, scale, zero, group, perm, bb, silu_mul, None)
    assert torch.equal(again, got if m < cuda.KEPT_COPY_FROM else plain)
    set_options(KernelOptions())
    calls.clear()
    fp32 = cuda._linear_int4(x, qweight, scale, zero, group, perm, b, silu_mul, None)
    assert calls == [] and torch.equal(fp32, reference.linear_int4_reference(x, qweight, scale, zero, group, perm, b,
                                                                             silu_mul))
    set_options(KernelOptions(reference_kernels=True))
    kept = int4_quant.dequantize(qweight, scale, zero, group, torch.bfloat16)  # the copy dequantized.keep makes
    assert torch.equal(cuda._linear_int4(xb, qweight, scale, zero, group, perm, bb, silu_mul, kept), want)
    assert calls == []


def test_registered_op_is_the_twin_and_its_fake_matches():
    qweight, scale, zero = int4_weight(48, 64, 32)
    x, perm = torch.randn(3, 64), torch.randperm(64).to(torch.int32)
    assert torch.equal(ops.linear_int4(x, qweight, scale, zero, 32, perm, silu_mul=True),
                       reference.linear_int4_reference(x, qweight, scale, zero, 32, perm, None, True))
    # schema and fake only: the AOT-dispatch check reads every backend's RNG state, which the NPU tests' stand-in
    # backend (installed for the rest of the session) lacks
    torch.library.opcheck(torch.ops.nanovllm.linear_int4.default, (x, qweight, scale, zero, 32, perm, None, True, None),
                          test_utils=("test_schema", "test_faketensor"))
