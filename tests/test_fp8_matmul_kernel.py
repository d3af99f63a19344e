"""The skinny Triton matmul over an FP8 weight (``W_FP8`` in nanovllm/kernels/triton_matmul.py) against its twin
``reference.linear_reference`` on CPU under the Triton interpreter, ``choose_fp8``'s configurations, and the CUDA
dispatch of an FP8 ``nanovllm::linear`` (``cuda._linear``, called on CPU tensors).
"""
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from nanovllm.kernels import matmul_configs, reference, weight_quant  # noqa: E402
from nanovllm.kernels.matmul_configs import MatmulConfig, choose_fp8, fp8_config  # noqa: E402
from nanovllm.kernels.options import KernelOptions, set_options  # noqa: E402
from nanovllm.kernels.triton_matmul import dequantize_triton, linear_triton  # noqa: E402

CONFIGS = [
    MatmulConfig(16, 32, 32),
    MatmulConfig(16, 16, 32, split_k=2),
    MatmulConfig(32, 16, 16, split_k=4, swap=True),
    MatmulConfig(16, 32, 64, swap=True, split_k=2),
]


def fp8_weight(n, k, group, seed=0):
    """An FP8 weight [n, k] whose rows and groups have scales far apart (a per-tile scale mix-up shows)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) / 8
    w *= torch.logspace(-2, 1, n)[:, None] * torch.linspace(0.2, 5, k)[None, :]
    return weight_quant.quantize(w, group)


def rel_err(got, want):
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("group", [128, 64, 32])  # one group (group = K), two, four
@pytest.mark.parametrize("silu_mul", [False, True])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_fp8_kernel_matches_twin(cfg, group, silu_mul, m):
    torch.manual_seed(m)
    k, n = 128, 80  # N_OUT = 80 (or 40 with silu_mul): a partial last column block
    w, scale = fp8_weight(n, k, group, seed=m)
    x, b = torch.randn(m, k), torch.randn(n)
    if not cfg.fits_fp8(k, group):  # a K-tile would straddle two groups
        with pytest.raises(AssertionError, match=f"groups of {group}"):
            linear_triton(x, w, None, cfg, silu_mul, scale, group)
        return
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for bias in (None, b.to(dtype)):
            got = linear_triton(x.to(dtype), w, bias, cfg, silu_mul, scale, group)
            want = reference.linear_reference(x.to(dtype).float(), w, None if bias is None else bias.float(),
                                              silu_mul, scale, group)
            assert got.dtype == dtype and got.shape == want.shape
            assert rel_err(got, want) < tol, f"{dtype} bias={bias is not None}: relative error"


def test_scale_changes_per_tile_only_inside_a_split():
    # K = 128 in groups of 64: a split of 128 or of 96 columns spans two groups, a split of 64 lies in one.
    assert MatmulConfig(16, 32, 32).scales_per_tile(128, 64)
    assert not MatmulConfig(16, 32, 32, split_k=2).scales_per_tile(128, 64)
    assert not MatmulConfig(16, 32, 32).scales_per_tile(128, 128)  # one group: the scale once at the end
    assert not MatmulConfig(16, 32, 32).scales_per_tile(96, 128)
    assert MatmulConfig(16, 32, 64).fits_fp8(128, 64) and not MatmulConfig(16, 32, 128).fits_fp8(256, 64)


@pytest.mark.parametrize("cfg", [MatmulConfig(16, 32, 32), MatmulConfig(16, 16, 16, split_k=2, swap=True)],
                         ids=str)
def test_partial_last_group(cfg):
    """K = 96 in groups of 64: the second group has 32 columns, and its scale serves only those."""
    k, n, group = 96, 48, 64
    w, scale = fp8_weight(n, k, group, seed=3)
    assert scale.shape == (n, 2)
    x = torch.randn(7, k)
    got = linear_triton(x, w, None, cfg, False, scale, group)
    assert rel_err(got, reference.linear_reference(x, w, None, False, scale, group)) < 1e-5


def test_dequantize_triton_is_the_twins_dequantize():
    for k, group in ((128, 128), (96, 64), (200, 16)):
        w, scale = fp8_weight(24, k, group)
        for dtype in (torch.float32, torch.float16):
            assert torch.equal(dequantize_triton(w, scale, group, dtype), weight_quant.dequantize(w, scale, group,
                                                                                                 dtype))
        # the interpreter rounds fp32 to bf16 by truncation (the GPU to nearest): equal within one bf16 step
        got = dequantize_triton(w, scale, group, torch.bfloat16)
        torch.testing.assert_close(got, weight_quant.dequantize(w, scale, group, torch.bfloat16), rtol=2 ** -7,
                                   atol=0)


def test_choose_fp8_picks_a_fitting_config_by_row_count(restore_options):
    w = torch.empty(2048, 1024, dtype=weight_quant.FP8_DTYPE)
    for m in (1, 5, 16, 33, matmul_configs.FP8_TRITON_MAX_M):
        x = torch.empty(m, 1024, dtype=torch.bfloat16)
        for group, silu in ((128, False), (64, True), (1024, False)):
            cfg = choose_fp8(x, w, silu, group)
            assert cfg is not None and cfg.fits_fp8(1024, group), (m, group)
            assert m <= cfg.block_m or cfg.block_m >= 64
    small, large = (choose_fp8(torch.empty(m, 1024, dtype=torch.bfloat16), w, False, 128) for m in (1, 64))
    assert small.block_m == 16 and large.block_m == 64
    # a decode batch with too few output blocks for the SMs splits K (8 SMs stand in for a GPU on CPU)
    assert choose_fp8(torch.empty(1, 1024, dtype=torch.bfloat16), w[:64], False, 128).split_k > 1
    assert choose_fp8(torch.empty(1, 1024, dtype=torch.bfloat16), w[:64], False, 16).block_k == 16
    big = torch.empty(matmul_configs.FP8_TRITON_MAX_M + 1, 1024, dtype=torch.bfloat16)
    assert choose_fp8(big, w, False, 128) is None  # prefill: dequantize once, then cuBLAS
    assert choose_fp8(torch.empty(4, 1000, dtype=torch.bfloat16), w, False, 128) is None  # K = 1000: no BLOCK_K
    assert choose_fp8(torch.empty(4, 1024), w, False, 128) is None  # fp32 stays exact, on the twin
    set_options(KernelOptions(triton_matmul=False))
    assert choose_fp8(torch.empty(4, 1024, dtype=torch.bfloat16), w, False, 128) is None


def test_choose_fp8_reads_the_table_rows_of_its_group(tmp_path, monkeypatch, restore_options):
    """A shape the table measured in FP8 takes its rows (a null row or past the last: dequantize + cuBLAS, None);
    the key holds the group, one per row keyed as K; another group or a bf16 key leaves the built-in tiles."""
    import json
    swapped = {"block_m": 128, "block_n": 64, "block_k": 128, "swap": True, "num_warps": 8, "num_stages": 3}
    table = {"arch": {"9.0": {
        matmul_configs.table_key(2048, 1024, False, 128): [[16, None], [256, swapped]],
        matmul_configs.table_key(2048, 1024, False, 4096): [[64, {"block_m": 64, "block_n": 64, "block_k": 256,
                                                                      "split_k": 8}]],
        matmul_configs.table_key(2048, 1024, False): [[256, None]]}}}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    set_options(KernelOptions.from_env({"NANOVLLM_MATMUL_TABLE": str(path)}))
    monkeypatch.setattr(matmul_configs, "_arch", lambda device: "9.0")

    class FakeCuda:  # choose_fp8 reads dtype, shape, device and is_cuda
        is_cuda, device = True, torch.device("cpu")  # _num_sms: 8 SMs off the GPU

        def __init__(self, m, k=1024):
            self.dtype, self.shape = torch.bfloat16, (m, k)

    w = torch.empty(2048, 1024, dtype=weight_quant.FP8_DTYPE)
    assert matmul_configs.table_key(2048, 1024, False, 4096) == "2048,1024,0,fp8:1024"
    assert choose_fp8(FakeCuda(8), w, False, 128) is None  # the row says dequantize + cuBLAS
    assert choose_fp8(FakeCuda(200), w, False, 128) == MatmulConfig(128, 64, 128, swap=True, num_warps=8,
                                                                    num_stages=3)
    assert choose_fp8(FakeCuda(257), w, False, 128) is None  # past the rows
    assert choose_fp8(FakeCuda(8), w, False, 1024) is None  # one scale per row; 8 splits of 256 do not fit K
    assert choose_fp8(FakeCuda(8), w, False, 64) == fp8_config(8, 2048, 1024, 64, 8)  # unmeasured group


def test_fp8_config_splits_k_until_the_sms_are_busy():
    # Qwen3-8B on 132 SMs: qkv (6144 rows, 96 tiles of 64) splits in two at M = 1; gate_up's 12288 do not split
    assert fp8_config(1, 6144, 4096, 128, 132) == MatmulConfig(16, 64, 128, split_k=2)
    assert fp8_config(1, 12288, 4096, 128, 132).split_k == 1
    assert fp8_config(1, 1024, 1024, 128, 132).split_k == 8  # 16 tiles; K = 1024 in 8 splits of one tile
    assert fp8_config(200, 1024, 1024, 128, 132).split_k == 1  # past decode sizes K is not split
    assert fp8_config(8192, 4096, 4096, 128, 132) == MatmulConfig(64, 64, 128)  # past the table: its last tile


@pytest.mark.parametrize("m", [3, 17, matmul_configs.FP8_TRITON_MAX_M + 1])
@pytest.mark.parametrize("silu_mul", [False, True])
def test_cuda_linear_dispatch_of_fp8_matches_twin(monkeypatch, restore_options, m, silu_mul):
    """``cuda._linear`` runs the FP8 kernel at small M, dequantize + F.linear past FP8_TRITON_MAX_M (F.linear alone
    on a kept dequantized copy, from KEPT_COPY_FROM rows: bit for bit dequantize + F.linear), and the twin for
    float32 activations or reference kernels, all agreeing with the twin."""
    from nanovllm.kernels import cuda
    calls = []
    for name in ("linear_triton", "dequantize_triton"):
        def spy(*args, _name=name, _fn=getattr(cuda, name)):
            calls.append(_name)
            return _fn(*args)
        monkeypatch.setattr(cuda, name, spy)
    k, n, group = 64, 32, 32
    w, scale = fp8_weight(n, k, group)
    x, b = torch.randn(m, k), torch.randn(n)
    want = reference.linear_reference(x.to(torch.bfloat16), w, b.to(torch.bfloat16), silu_mul, scale, group)
    got = cuda._linear(x.to(torch.bfloat16), w, b.to(torch.bfloat16), silu_mul, scale, group, None)
    assert calls == (["linear_triton"] if m <= matmul_configs.FP8_TRITON_MAX_M else ["dequantize_triton"])
    assert got.dtype == torch.bfloat16 and rel_err(got, want) < 2e-2
    calls.clear()  # with the dequantized copy kept (quant/dequantized.py): cuBLAS takes it from KEPT_COPY_FROM rows
    kept = dequantize_triton(w, scale, group, torch.bfloat16)  # on the GPU weight_quant.dequantize's (tests/gpu)
    again = cuda._linear(x.to(torch.bfloat16), w, b.to(torch.bfloat16), silu_mul, scale, group, kept)
    assert 3 < cuda.KEPT_COPY_FROM <= 17 <= matmul_configs.FP8_TRITON_MAX_M  # before it, past it in the rows
    assert calls == (["linear_triton"] if m < cuda.KEPT_COPY_FROM else [])
    set_options(KernelOptions(triton_matmul=False))  # dequantize + F.linear at every M: what the copy must equal
    plain = cuda._linear(x.to(torch.bfloat16), w, b.to(torch.bfloat16), silu_mul, scale, group, None)
    assert torch.equal(again, got if m < cuda.KEPT_COPY_FROM else plain)
    set_options(KernelOptions())
    calls.clear()
    fp32 = cuda._linear(x, w, b, silu_mul, scale, group, None)
    assert calls == [] and torch.equal(fp32, reference.linear_reference(x, w, b, silu_mul, scale, group))
    set_options(KernelOptions(reference_kernels=True))
    kept = weight_quant.dequantize(w, scale, group, torch.bfloat16)  # the copy dequantized.keep makes
    assert torch.equal(cuda._linear(x.to(torch.bfloat16), w, b.to(torch.bfloat16), silu_mul, scale, group, kept),
                       want)
    assert calls == []


@pytest.mark.parametrize("cfg", [MatmulConfig(16, 32, 32), MatmulConfig(16, 16, 64, split_k=2, swap=True)], ids=str)
def test_bf16_activations_past_fp16_range(cfg):
    """bf16 x meets an FP8 weight in fp16 MMAs (``FP16_MMA``): x is scaled by 2^-4 first, so activations far past
    fp16's 65504 stay finite and exact, and small ones keep their bits down to 2^-10."""
    k, n, group = 128, 48, 64
    w, scale = fp8_weight(n, k, group, seed=5)
    x = torch.randn(4, k)
    x[0] *= 3e5  # a "massive activation" row: x / 16 still inside fp16
    x[1] *= 2.0 ** -9  # small values: still fp16 normals after the 2^-4 scale
    x = x.bfloat16()
    got = linear_triton(x, w, None, cfg, False, scale, group)
    want = reference.linear_reference(x.float(), w, None, False, scale, group)
    assert torch.isfinite(got).all()
    for row in range(4):  # as close as the rows of bf16 x in test_fp8_kernel_matches_twin (0.2-0.5%)
        assert rel_err(got[row], want[row]) < 1e-2, f"row {row}"
