"""Programmatic dependent launch (nanovllm/kernels/pdl.py): when it is on, and the protocol every kernel follows."""
import ast
import inspect
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported, as in the other kernel tests

import pytest  # noqa: E402
import torch  # noqa: E402

from nanovllm.kernels import (pdl, triton_attention, triton_decode, triton_matmul, triton_rope_store,  # noqa: E402
                              triton_sampler)
from nanovllm.kernels.options import KernelOptions, current_options, set_options  # noqa: E402

KERNEL_MODULES = (triton_attention, triton_decode, triton_matmul, triton_rope_store, triton_sampler)


def test_off_without_cuda_or_when_disabled(restore_options):
    assert not pdl.pdl_enabled(torch.device("cpu"))
    assert pdl.pdl_launch(torch.device("cpu")) == {"PDL": False}  # no launch_pdl: the interpreter never sees it
    set_options(KernelOptions.from_env({"NANOVLLM_PDL": "0"}))
    assert not pdl.pdl_enabled(torch.device("cuda", 0))  # decided before any CUDA query
    set_options(KernelOptions.from_env({"NANOVLLM_PDL": "1", "TRITON_INTERPRET": "1"}))
    assert not current_options().pdl and not pdl.pdl_enabled(torch.device("cuda", 0))


def test_hopper_features_off_sends_a_hopper_gpu_down_the_pre_hopper_path(monkeypatch, restore_options):
    """One switch (NANOVLLM_HOPPER_FEATURES=0) turns off both TMA loads and PDL, on an sm_90 GPU as on older ones."""
    from nanovllm.kernels import triton_common
    monkeypatch.setattr(triton_common, "device_capability", lambda device: (9, 0))
    gpu = torch.device("cuda", 0)
    q, k_cache = torch.empty(2, 4, 64, dtype=torch.bfloat16), torch.empty(8, 2, 64, 64, dtype=torch.bfloat16)
    monkeypatch.setattr(torch.Tensor, "device", property(lambda t: gpu))  # tensors that report the (fake) GPU
    set_options(KernelOptions.from_env({}))
    assert pdl.pdl_enabled(gpu) and triton_decode.use_tma(q, k_cache, 64)
    set_options(KernelOptions.from_env({"NANOVLLM_HOPPER_FEATURES": "0"}))
    assert not pdl.pdl_enabled(gpu) and not triton_decode.use_tma(q, k_cache, 64)
    monkeypatch.setattr(triton_common, "device_capability", lambda device: (8, 0))  # an A100: off either way
    set_options(KernelOptions.from_env({}))
    assert not pdl.pdl_enabled(gpu) and not triton_decode.use_tma(q, k_cache, 64)


def test_inductor_follows_the_switch(monkeypatch, restore_options):
    from torch._inductor import config
    if not hasattr(config.triton, "enable_pdl"):
        pytest.skip("this torch's Inductor has no PDL code generation")
    monkeypatch.delenv("TORCHINDUCTOR_ENABLE_PDL", raising=False)
    monkeypatch.setattr(config.triton, "enable_pdl", True)
    assert pdl.configure_inductor(torch.device("cpu")) is False
    assert config.triton.enable_pdl is False
    monkeypatch.setenv("TORCHINDUCTOR_ENABLE_PDL", "1")  # an explicit setting wins
    monkeypatch.setattr(config.triton, "enable_pdl", True)
    assert pdl.configure_inductor(torch.device("cpu")) is True


def _pdl_kernels():
    for module in KERNEL_MODULES:
        tree = ast.parse(inspect.getsource(module))
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and "PDL" in [a.arg for a in node.args.args]:
                yield f"{module.__name__}.{node.name}", node


def _is_pdl_begin(stmt) -> bool:
    return (isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Call)
            and getattr(stmt.value.func, "id", None) == "pdl_begin")


def test_every_pdl_kernel_waits_before_it_can_return():
    kernels = dict(_pdl_kernels())
    assert {"_decode_kernel", "_linear_kernel", "_rope_store_kernel", "_prefill_kernel"} <= {
        name.rsplit(".", 1)[1] for name in kernels}
    for name, fn in kernels.items():
        body = fn.body[1:] if isinstance(fn.body[0], ast.Expr) and isinstance(fn.body[0].value, ast.Constant) \
            else fn.body  # skip a docstring
        first = next((i for i, stmt in enumerate(body) if _is_pdl_begin(stmt)), None)
        assert first is not None, f"{name} takes PDL but never calls pdl_begin at its top level"
        before = body[:first]
        assert not any(isinstance(n, ast.Return) for stmt in before for n in ast.walk(stmt)), \
            f"{name} may return before pdl_begin"
        loads = [n for stmt in before for n in ast.walk(stmt)
                 if isinstance(n, ast.Call) and getattr(n.func, "attr", None) in ("load", "store", "atomic_add")]
        assert not loads, f"{name} reads or writes memory before pdl_begin"


def test_every_pdl_launch_passes_the_switch():
    """A kernel taking PDL is launched with ``**pdl_launch(...)``, so ``launch_pdl`` and the wait go together."""
    for module in KERNEL_MODULES:
        source = inspect.getsource(module)
        for name, _ in _pdl_kernels():
            kernel = name.rsplit(".", 1)[1]
            if not name.startswith(module.__name__ + "."):
                continue
            launch = source.split(f"{kernel}[", 1)
            assert len(launch) == 2, f"{kernel} is never launched"
            call = launch[1].split(")\n", 1)[0]
            assert "**pdl_launch(" in call, f"{kernel}'s launch does not pass **pdl_launch(...)"
