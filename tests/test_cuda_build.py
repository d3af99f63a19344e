"""The CUDA C++ kernels' build and load (nanovllm/kernels/cuda_build.py) and the gates of the int4 projection
(nanovllm/kernels/cuda_w4a16.py) and the int4 and FP8 MoE experts (cuda_moe.py) on a machine without a GPU: the
switch, the reasons a kernel stays off (logged), the cached build through a stand-in nvcc (a shell script compiling a
C stub of the library's one function), the calls the kernels refuse, and the column order the MoE kernel reads x in.
Their numbers are tests/gpu/test_int4_weights.py's and test_fp8_weights.py's, on a GPU."""
import ctypes
import logging
import shutil
import textwrap

import pytest
import torch

from nanovllm.envs import get
from nanovllm.kernels import cuda_build, cuda_moe, cuda_w4a16, int4_quant, weight_quant
from nanovllm.kernels.options import KernelOptions, set_options
from nanovllm.logger import logger


@pytest.fixture
def log_lines():
    lines, level = [], logger.level
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # whatever NANOVLLM_LOG_LEVEL says
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    monkeypatch.setenv("NANOVLLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cuda_build, "_loaded", {})
    return tmp_path


def fake_nvcc(tmp_path, body: str) -> str:
    path = tmp_path / "nvcc"
    path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


def test_the_switch_and_its_bad_value():
    assert KernelOptions.from_env({}).cuda_kernels
    assert not KernelOptions.from_env({"NANOVLLM_CUDA_KERNELS": "off"}).cuda_kernels
    with pytest.raises(ValueError, match="NANOVLLM_CUDA_KERNELS='of'"):
        get("NANOVLLM_CUDA_KERNELS", {"NANOVLLM_CUDA_KERNELS": "of"})


def test_nothing_loads_off_cuda_or_switched_off(fresh, monkeypatch):
    assert cuda_build.load("w4a16_mma", torch.device("cpu")) is None
    set_options(KernelOptions(cuda_kernels=False))
    try:
        assert cuda_build.load("w4a16_mma", torch.device("cuda", 0)) is None  # before asking the device anything
    finally:
        set_options(KernelOptions())


def test_no_nvcc_is_said_once_and_the_kernel_stays_off(fresh, monkeypatch, log_lines):
    monkeypatch.setattr(cuda_build, "nvcc_path", lambda: None)
    assert cuda_build._load("w4a16_mma", "sm_90") is None
    assert log_lines == ["CUDA kernel w4a16_mma off: no nvcc (CUDA_HOME or PATH); its Triton path runs"]


def test_a_failed_build_names_nvcc_and_its_error(fresh, monkeypatch, log_lines):
    nvcc = fake_nvcc(fresh, "echo 'w4a16_mma.cu(3): error: no such type' >&2\nexit 2\n")
    with pytest.raises(RuntimeError, match=r"nvcc exited 2: w4a16_mma.cu\(3\): error: no such type"):
        cuda_build.build("w4a16_mma", "sm_90", nvcc)
    monkeypatch.setattr(cuda_build, "nvcc_path", lambda: nvcc)
    assert cuda_build._load("w4a16_mma", "sm_90") is None  # the loader: a warning, and the Triton path
    assert len(log_lines) == 3 and "its build failed (nvcc exited 2" in log_lines[-1], log_lines


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler for the stand-in library")
def test_a_build_is_cached_by_source_arch_and_nvcc_and_loads(fresh):
    stub = fresh / "stub.c"
    stub.write_text("int nvl_w4a16_mma(void) { return 42; }\n")
    calls = fresh / "calls"
    # the stand-in takes nvcc's arguments, counts its runs and compiles the stub to the -o path
    nvcc = fake_nvcc(fresh, f"""
        echo "$@" >> {calls}
        while [ "$1" != "-o" ]; do shift; done
        cc -shared -fPIC -o "$2" {stub}
    """)
    first = cuda_build.build("w4a16_mma", "sm_90", nvcc)
    assert first == cuda_build.library_path("w4a16_mma", "sm_90", nvcc) and first.is_file()
    assert cuda_build.build("w4a16_mma", "sm_90", nvcc) == first
    args = calls.read_text().splitlines()
    assert len(args) == 1 and "-arch=sm_90" in args[0] and args[0].endswith("w4a16_mma.cu"), args
    assert cuda_build.library_path("w4a16_mma", "sm_89", nvcc) != first  # another GPU: another build
    assert ctypes.CDLL(str(first)).nvl_w4a16_mma() == 42
    assert not list(first.parent.glob("*.tmp")), "the partial library was renamed into place"


def test_the_kernel_takes_one_to_eight_rows_and_whole_128_column_groups_only():
    q, s, z = int4_quant.quantize(torch.randn(64, 256), 128)
    x = torch.randn(8, 256, dtype=torch.bfloat16)
    assert cuda_w4a16.fits(x, q, s, z, 128) and cuda_w4a16.fits(x, q, s, z, 256)  # groups of 128; one group
    assert cuda_w4a16.fits(x[:1], q, s, z, 128) and cuda_w4a16.fits(x.half()[:3], q, s, z, 128)
    assert cuda_w4a16.fits(torch.randn(2, 512, dtype=torch.bfloat16)[:, :256], q, s, z, 128)  # a row stride of 512
    assert not cuda_w4a16.usable(x, q, s, z, 128)  # ... but not on a GPU
    q64, s64, z64 = int4_quant.quantize(torch.randn(64, 256), 64)
    refused = {"nine rows": (torch.randn(9, 256, dtype=torch.bfloat16), q, s, z, 128),
               "fp32": (x.float(), q, s, z, 128), "groups of 64": (x, q64, s64, z64, 64),
               "an x not 16-byte aligned": (torch.randn(1, 257, dtype=torch.bfloat16)[:, 1:], q, s, z, 128),
               "a row stride not a multiple of 8": (torch.randn(2, 260, dtype=torch.bfloat16)[:, :256], q, s, z, 128),
               "K of 128 + 64": (x[:, :192], q[:, :96], s, z, 128),
               "strided scales": (x, q, s.t().contiguous().t(), z, 128)}
    for why, args in refused.items():
        assert not cuda_w4a16.fits(*args), why


def test_the_moe_kernel_takes_int4_experts_in_its_contract_only():
    e, h, i = 4, 256, 384

    def experts(i=i, group=128):  # (w13, w2, scales, zeros) of int4 experts
        (q13, s13, z13), (q2, s2, z2) = (int4_quant.quantize(w, group) for w in (torch.randn(e, 2 * i, h),
                                                                                 torch.randn(e, h, i)))
        return q13, q2, (s13, s2), (z13, z2)
    q13, q2, scales, zeros = experts()
    x = torch.randn(5, h, dtype=torch.bfloat16)
    assert cuda_moe.moe_fits(x, q13, q2, scales, zeros, 128) and cuda_moe.moe_fits(x.half(), *experts(), 384)
    assert not cuda_moe.moe_usable(x, 2, q13, q2, scales, zeros, 128)  # ... but not on a GPU
    transposed = q2.transpose(1, 2).contiguous().transpose(1, 2)
    refused = {"fp32": (x.float(), q13, q2, scales, zeros, 128), "groups of 64": (x, *experts(group=64), 64),
               "I of 192 (one group)": (x, *experts(i=192, group=h), h),
               "a transposed w2 (an expert cache's view)": (x, q13, transposed, scales, zeros, 128),
               "fp32 scales": (x, q13, q2, tuple(t.float() for t in scales), zeros, 128),
               "int32 zeros": (x, q13, q2, scales, tuple(t.int() for t in zeros), 128),
               "an x not 16-byte aligned": (torch.randn(5, h + 1, dtype=torch.bfloat16)[:, 1:], q13, q2, scales,
                                            zeros, 128)}
    for why, args in refused.items():
        assert not cuda_moe.moe_fits(*args), why


def test_the_moe_kernel_takes_fp8_experts_in_its_contract_only():
    e, h, i, none = 4, 256, 384, (None, None)

    def experts(i=i, group=128):  # (w13, w2, scales) of e4m3 experts, float32 scales per row and group
        (q13, s13), (q2, s2) = (weight_quant.quantize(w, group) for w in (torch.randn(e, 2 * i, h),
                                                                          torch.randn(e, h, i)))
        return q13, q2, (s13, s2)
    q13, q2, scales = experts()
    x = torch.randn(5, h, dtype=torch.bfloat16)
    assert cuda_moe.moe_fits(x, q13, q2, scales, none, 128) and cuda_moe.moe_fits(x.half(), *experts(group=384), none,
                                                                                  384)
    assert not cuda_moe.moe_usable(x, 2, q13, q2, scales, none, 128)  # ... but not on a GPU
    refused = {"fp32": (x.float(), q13, q2, scales, none, 128), "groups of 64": (x, *experts(group=64), none, 64),
               "I of 192": (x, *experts(i=192), none, 128),
               "a transposed w2": (x, q13, q2.transpose(1, 2).contiguous().transpose(1, 2), scales, none, 128),
               "fp16 scales": (x, q13, q2, tuple(t.half() for t in scales), none, 128),
               "zeros given": (x, q13, q2, scales, (q13, q2), 128), "no scales": (x, q13, q2, none, none, 128),
               "bf16 experts": (x, q13.bfloat16(), q2.bfloat16(), scales, none, 128)}
    for why, args in refused.items():
        assert not cuda_moe.moe_fits(*args), why


def test_the_moe_kernel_takes_steps_of_up_to_64_pairs_per_int4_expert_and_12_per_fp8_one():
    assert cuda_moe.MOE_MAX_MEAN_ROWS == 64 and cuda_moe.FP8_MAX_MEAN_ROWS == 12
    assert cuda_moe.moe_faster(256, 2, 8) and not cuda_moe.moe_faster(257, 2, 8)  # Mixtral
    assert cuda_moe.moe_faster(1024, 8, 128) and not cuda_moe.moe_faster(1025, 8, 128)  # Qwen3-30B-A3B
    assert cuda_moe.moe_faster(192, 8, 128, fp8=True) and not cuda_moe.moe_faster(193, 8, 128, fp8=True)
    assert cuda_moe.moe_faster(1, 8, 128) and cuda_moe.moe_faster(1, 8, 128, fp8=True)


def test_the_moe_layout_block_holds_twice_an_experts_mean_pairs_up_to_32():
    blocks = {tokens: cuda_moe.moe_block(tokens, 2, 8) for tokens in (1, 16, 17, 32, 33, 64, 256, 1000)}  # Mixtral
    assert blocks == {1: 8, 16: 8, 17: 16, 32: 16, 33: 32, 64: 32, 256: 32, 1000: 32}
    assert [cuda_moe.moe_block(t, 8, 128) for t in (64, 65, 128, 129, 256, 1024)] == [8, 16, 16, 32, 32, 32]
    picks = [cuda_moe.moe_block(t, 8, 128) for t in range(1, 2000, 37)]  # never smaller for more tokens
    assert picks == sorted(picks) and picks[-1] == cuda_moe.MOE_MAX_BLOCK


def test_the_moe_kernel_reads_x_with_each_8_columns_in_its_mma_pairing():
    x = torch.arange(3 * 24, dtype=torch.float32).view(3, 24)
    got = cuda_moe.permute_columns(x[:, :16])  # a strided x
    assert got.shape == (3, 16) and got.is_contiguous()
    for n in range(16):  # column 8i + j lands at 8i + 2 (j % 4) + j // 4: 0, 4, 1, 5, 2, 6, 3, 7
        assert torch.equal(got[:, n // 8 * 8 + 2 * (n % 4) + n % 8 // 4], x[:, n]), n
    with pytest.raises(AssertionError, match="12 columns"):
        cuda_moe.permute_columns(x[:, :12])


@pytest.mark.parametrize("fp8", [False, True], ids=["int4", "fp8"])
@pytest.mark.parametrize("block", cuda_moe.MOE_BLOCKS)
def test_the_moe_kernel_gets_int4_x_paired_past_blocks_of_8_and_fp8_x_in_fp16_over_16(monkeypatch, block, fp8):
    tokens, top_k, experts, hidden, inter = 4, 2, 4, 256, 128
    calls = []
    monkeypatch.setattr(cuda_moe, "align_triton", lambda ids, hist, e, b: (
        torch.zeros(e * b, dtype=torch.int32), torch.zeros(e, dtype=torch.int32), torch.zeros(e, dtype=torch.int32)))
    monkeypatch.setattr(cuda_moe, "_moe_gemm", lambda *a: calls.append((a[7].clone(), a[11], a[1], a[12])))
    x = torch.randn(tokens, hidden, dtype=torch.bfloat16) * 1e5  # past fp16's range, but not once divided by 16
    per_byte, dtype = (1, torch.float8_e4m3fn) if fp8 else (2, torch.uint8)
    w13 = torch.zeros(experts, 2 * inter, hidden // per_byte, dtype=dtype)
    w2 = torch.zeros(experts, hidden, inter // per_byte, dtype=dtype)
    ids = torch.zeros(tokens, top_k, dtype=torch.int32)
    cuda_moe.experts_cuda(x, torch.ones(tokens, top_k), ids, None, w13, w2, (None, None), (None, None), 128,
                          block=block)
    (up_x, inter_rows, up_fp16, up), (down_x, out, down_fp16, down) = calls
    assert up and not down and up_fp16 == down_fp16 == fp8 and out.dtype == torch.bfloat16
    if fp8:  # x / 16 in fp16, in its own column order; the intermediate rows fp16 too
        assert up_x.dtype == inter_rows.dtype == down_x.dtype == torch.float16 and up_x.isfinite().all()
        assert torch.equal(up_x, (x.float() / cuda_moe.FP16_X_SCALE).half())
    else:
        assert torch.equal(up_x, cuda_moe.permute_columns(x) if block > 8 else x) and inter_rows.dtype == x.dtype


def test_a_changed_shared_header_is_a_new_build(monkeypatch, tmp_path):
    sources = tmp_path / "cuda_src"
    shutil.copytree(cuda_build.SOURCES, sources)
    monkeypatch.setattr(cuda_build, "SOURCES", sources)
    nvcc = fake_nvcc(tmp_path, "exit 0\n")
    before = cuda_build.library_path("w4a16_moe", "sm_90", nvcc)
    header = sources / "w4a16_common.cuh"
    header.write_text(header.read_text() + "// changed\n")
    assert cuda_build.library_path("w4a16_moe", "sm_90", nvcc) != before


def test_the_sources_and_their_headers_ship_with_the_package():
    for name in ("w4a16_mma", "w4a16_moe"):
        source = (cuda_build.SOURCES / f"{name}.cu").read_text()
        included = [line.split('"')[1] for line in source.splitlines() if line.startswith('#include "')]
        assert included and all((cuda_build.SOURCES / h).is_file() for h in included), (name, included)
    setup = (cuda_build.SOURCES.parents[2] / "setup.py").read_text()
    assert '"cuda_src/*.cu", "cuda_src/*.cuh"' in setup, "setup.py's package_data must ship the sources and headers"
