"""The skinny Triton matmul (nanovllm/kernels/triton_matmul.py) against torch, on CPU under the Triton interpreter,
and the dispatch of ``ops.linear`` (which configuration, or cuBLAS, serves a shape).

The GPU timing sweep that fills the dispatch table is benchmarks/matmul_sweep.py.
"""
import json
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

from nanovllm.kernels import matmul_configs, ops  # noqa: E402
from nanovllm.kernels.matmul_configs import MatmulConfig  # noqa: E402
from nanovllm.kernels.options import KernelOptions, set_options  # noqa: E402
from nanovllm.kernels.triton_matmul import linear_triton, silu_mul_triton  # noqa: E402

CONFIGS = [
    MatmulConfig(16, 32, 32),
    MatmulConfig(16, 16, 32, split_k=2),
    MatmulConfig(32, 16, 16, split_k=4, swap=True),
    MatmulConfig(16, 32, 64, swap=True),
]


def reference(x, w, b, silu_mul):
    y = F.linear(x.double(), w.double(), None if b is None else b.double())
    if silu_mul:
        gate, up = y.chunk(2, dim=-1)
        y = F.silu(gate) * up
    return y


@pytest.mark.parametrize("cfg", CONFIGS, ids=str)
@pytest.mark.parametrize("silu_mul", [False, True])
@pytest.mark.parametrize("m", [1, 5, 33])
def test_kernel_matches_torch(cfg, silu_mul, m):
    torch.manual_seed(m)
    k, n = 128, 80  # N_OUT = 80 (or 40 with silu_mul): a partial last column block
    x, w, b = torch.randn(m, k), torch.randn(n, k) / 8, torch.randn(n)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for bias in (None, b):
            got = linear_triton(x.to(dtype), w.to(dtype), None if bias is None else bias.to(dtype), cfg, silu_mul)
            want = reference(x.to(dtype), w.to(dtype), None if bias is None else bias.to(dtype), silu_mul)
            assert got.dtype == dtype and got.shape == want.shape
            err = ((got.double() - want).norm() / want.norm()).item()
            assert err < tol, f"{dtype} bias={bias is not None}: relative error {err:.2e}"


def test_split_k_counters_are_left_zero_and_reused():
    """The last split of each output block resets its counter, so repeated launches stay correct."""
    cfg = MatmulConfig(16, 16, 32, split_k=4)
    x, w = torch.randn(20, 128), torch.randn(48, 128)
    first = linear_triton(x, w, None, cfg)
    from nanovllm.kernels import triton_matmul
    counters = triton_matmul._counters(x.device)
    assert counters.abs().sum().item() == 0
    second = linear_triton(x, w, None, cfg)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(first, x @ w.T, rtol=1e-5, atol=1e-4)


def test_silu_mul_triton_matches_torch():
    y = torch.randn(7, 2 * 1500)
    gate, up = y.chunk(2, dim=-1)
    torch.testing.assert_close(silu_mul_triton(y), F.silu(gate) * up, rtol=1e-5, atol=1e-6)


def test_config_must_split_k_evenly():
    assert MatmulConfig(16, 32, 128, split_k=2).fits(8, 1024, 1024)
    assert not MatmulConfig(16, 32, 256, split_k=4).fits(8, 1024, 768)
    with pytest.raises(AssertionError, match="cannot run"):
        linear_triton(torch.randn(4, 96), torch.randn(32, 96), None, MatmulConfig(16, 32, 64))


def test_dispatch_reads_the_table_by_row_count(tmp_path, monkeypatch, restore_options):
    table = {"arch": {"9.0": {matmul_configs.table_key(1024, 2048, False): [
        [16, {"block_m": 16, "block_n": 32, "block_k": 128, "split_k": 4}], [64, None],
        [256, {"block_m": 64, "block_n": 64, "block_k": 128}]]}}}
    path = tmp_path / "table.json"
    path.write_text(json.dumps(table))
    set_options(KernelOptions.from_env({"NANOVLLM_MATMUL_TABLE": str(path)}))
    monkeypatch.setattr(matmul_configs, "_arch", lambda device: "9.0")

    class FakeCuda:  # choose() only reads dtype, shape and device
        def __init__(self, m, k, dtype=torch.bfloat16):
            self.dtype, self.shape, self.device = dtype, (m, k), None

    w = FakeCuda(1024, 2048)
    assert matmul_configs.choose(FakeCuda(8, 2048), w, False) == MatmulConfig(16, 32, 128, split_k=4)
    assert matmul_configs.choose(FakeCuda(48, 2048), w, False) is None  # cuBLAS won there
    assert matmul_configs.choose(FakeCuda(256, 2048), w, False) == MatmulConfig(64, 64, 128)
    assert matmul_configs.choose(FakeCuda(257, 2048), w, False) is None  # prefill-sized
    assert matmul_configs.choose(FakeCuda(8, 2048), w, True) is None  # no silu entry
    assert matmul_configs.choose(FakeCuda(8, 2048, torch.float32), FakeCuda(1024, 2048, torch.float32),
                                 False) is None  # fp32 stays with cuBLAS
    set_options(KernelOptions.from_env({"NANOVLLM_MATMUL_TABLE": str(path), "NANOVLLM_MATMUL": "cublas"}))
    assert matmul_configs.choose(FakeCuda(8, 2048), w, False) is None


def test_ops_linear_on_cpu_is_torch():
    x, w, b = torch.randn(6, 32), torch.randn(64, 32), torch.randn(64)
    torch.testing.assert_close(ops.linear(x, w, b), F.linear(x, w, b))
    gate, up = F.linear(x, w, b).chunk(2, dim=-1)
    torch.testing.assert_close(ops.linear(x, w, b, silu_mul=True), F.silu(gate) * up)


def test_row_limits_list_where_table_configs_end(monkeypatch, restore_options):
    """The start-up warm-up (GraphExecutor._compile_prefill_matmuls) runs the step at these row counts."""
    from nanovllm.kernels import matmul_configs
    assert matmul_configs.triton_row_limits(torch.device("cpu")) == []
    monkeypatch.setattr(matmul_configs, "_arch", lambda device: "9.0")
    table = json.loads(matmul_configs.TABLE_PATH.read_text())["arch"]["9.0"]
    want = sorted({m for rows in table.values() for m, cfg in rows if cfg})
    got = matmul_configs.triton_row_limits(torch.device("cuda", 0))
    assert got == want and got[0] >= 2 and got == sorted(got)
    set_options(KernelOptions(triton_matmul=False))
    assert matmul_configs.triton_row_limits(torch.device("cuda", 0)) == []
    set_options(KernelOptions(reference_kernels=True))  # the twins run: no Triton matmul to warm up
    assert matmul_configs.triton_row_limits(torch.device("cuda", 0)) == []
