"""The platform interface (nanovllm/platforms): options installed and kernels registered when a platform is made,
and the device facts the engine asks for (pinned staging, completion events, arch, a description)."""
import re

import pytest
import torch

from nanovllm.kernels import ops, sampling
from nanovllm.kernels.options import KernelOptions, current_options
from nanovllm.platforms import get_platform


def test_cpu_platform_facts(restore_options):
    platform = get_platform("cpu")
    assert platform.name == "cpu" and platform.device == torch.device("cpu")
    assert platform.pin_memory is False and platform.supports_graph_capture is False
    platform.record_event().synchronize()  # nothing queued on a CPU: returns at once
    assert re.fullmatch(r".+ flags=[0-9a-f]{12}", platform.arch())
    assert platform.describe() == {"name": "cpu", "device": "cpu", "arch": platform.arch(),
                                   "options": platform.options.as_dict(), "versions": {}}
    assert platform.distributed_backend == "gloo" and not platform.measures_memory and not platform.static_shapes


def test_making_a_platform_installs_its_options_from_the_environment(monkeypatch, restore_options):
    monkeypatch.setenv("NANOVLLM_KERNELS", "reference")
    monkeypatch.setenv("NANOVLLM_MATMUL", "cublas")
    platform = get_platform("cpu")
    assert platform.options == KernelOptions(reference_kernels=True, triton_matmul=False, pdl=platform.options.pdl)
    assert current_options() is platform.options
    monkeypatch.setenv("NANOVLLM_KERNELS", "auto")
    assert current_options() is not get_platform("cpu").options is not platform.options  # the last one made wins


def test_explicit_options_win_over_the_environment(monkeypatch, restore_options):
    monkeypatch.setenv("NANOVLLM_KERNELS", "reference")
    mine = KernelOptions(pdl=False)
    assert get_platform("cpu", options=mine).options is mine and current_options() is mine


def test_a_bad_environment_value_fails_when_the_platform_is_made(monkeypatch, restore_options):
    monkeypatch.setenv("NANOVLLM_MATMUL", "fast")
    with pytest.raises(ValueError, match="NANOVLLM_MATMUL='fast'"):
        get_platform("cpu")


def test_compiled_cpu_steps_inline_the_sampler(restore_options):
    """The CPU platform gives Inductor the sampler's twin, so the op is fused, not called; same tokens."""
    from torch._inductor.utils import run_and_get_code
    get_platform("cpu")
    get_platform("cpu")  # registering twice is harmless
    logits, temperature = torch.randn(4, 300), torch.tensor([0.0, 1.0, 0.7, 2.0])
    seeds, positions = torch.arange(4) * 7, torch.arange(4)
    torch._dynamo.reset()
    with torch._inductor.config.patch(force_disable_caches=True):  # the caches' keys leave out decompositions
        tokens, code = run_and_get_code(torch.compile(ops.gumbel_argmax, fullgraph=True), logits, temperature,
                                        seeds, positions)
    assert not any("nanovllm.gumbel_argmax" in c for c in code)  # no call of the op (fused kernels keep its name)
    assert torch.equal(tokens, sampling.gumbel_argmax_reference(logits, temperature, seeds, positions))


def test_a_compile_before_the_cpu_platform_does_not_hide_its_decompositions(monkeypatch, restore_options):
    """Inductor memoises a copy of its decomposition table at a process's first compile; a CPU platform made after
    that compile must still put the twins in the table Inductor uses.  Replays that order: the twins taken out of
    the table, the copy memoised without them, then the registration done again."""
    from torch._inductor import decomposition

    from nanovllm.kernels import cpu
    twins = (torch.ops.nanovllm.gumbel_argmax.default, torch.ops.nanovllm.process_logits.default)
    for op in twins:
        monkeypatch.delitem(decomposition.decompositions, op, raising=False)
    monkeypatch.setattr(cpu, "_registered", False)
    decomposition.fast_random_decomps.cache_clear()
    assert not any(op in decomposition.select_decomp_table() for op in twins)  # memoised without the twins
    get_platform("cpu")
    assert all(op in decomposition.select_decomp_table() for op in twins)


def test_cuda_below_compute_capability_8_gets_float16(monkeypatch):
    """Volta and Turing have no bfloat16: ``auto`` gives float16 there and asking for bfloat16 names the GPU."""
    from nanovllm.platforms.cuda import CudaPlatform
    platform = object.__new__(CudaPlatform)  # no GPU here: only the dtype rule is exercised
    platform.device = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert platform.resolve_dtype("auto", "bfloat16") == torch.float16
    assert platform.resolve_dtype("auto", None) == torch.float16
    assert platform.resolve_dtype("auto", "float32") == torch.float32
    with pytest.raises(ValueError, match=r"dtype='bfloat16'.*Tesla T4 sm_75"):
        platform.resolve_dtype("bfloat16", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert platform.resolve_dtype("auto", "bfloat16") == torch.bfloat16
    assert CudaPlatform.distributed_backend == "nccl" and CudaPlatform.measures_memory


def test_a_bad_device_names_the_value():
    with pytest.raises(ValueError, match="device='tpu'"):
        get_platform("tpu")
