"""Kernel options (nanovllm/kernels/options.py): read from the environment in one place, validated, installed for the
process by ``set_options`` and read by the kernels through ``current_options``."""
import dataclasses

import pytest

from nanovllm.kernels import options as opts
from nanovllm.kernels.options import KernelOptions, current_options, set_options


def test_defaults_when_nothing_is_set():
    assert KernelOptions.from_env({}) == KernelOptions()
    assert KernelOptions().as_dict() == {"reference_kernels": False, "triton_matmul": True, "matmul_table": None,
                                         "pdl": True, "hopper_features": True, "npu_graph_mode": "max-autotune",
                                         "mps_compile": False, "all_reduce": "auto",
                                         "moe_w8a8": True, "moe_table": None, "cuda_kernels": True,
                                         "dequantized_copies": "auto"}


def test_each_variable_sets_its_option():
    env = {"NANOVLLM_KERNELS": "reference", "NANOVLLM_MATMUL": "cublas", "NANOVLLM_MATMUL_TABLE": "/t.json",
           "NANOVLLM_PDL": "0", "NANOVLLM_HOPPER_FEATURES": "0", "NANOVLLM_NPU_GRAPH_MODE": "reduce-overhead",
           "NANOVLLM_MPS_COMPILE": "1", "NANOVLLM_ALLREDUCE": "nccl", "NANOVLLM_MOE_TABLE": "/m.json",
           "NANOVLLM_CUDA_KERNELS": "off", "NANOVLLM_DEQUANTIZED_COPIES": "off"}
    assert KernelOptions.from_env(env) == KernelOptions(reference_kernels=True, triton_matmul=False,
                                                        matmul_table="/t.json", pdl=False, hopper_features=False,
                                                        npu_graph_mode="reduce-overhead", mps_compile=True,
                                                        all_reduce="nccl", moe_table="/m.json", cuda_kernels=False,
                                                        dequantized_copies="off")
    assert KernelOptions.from_env({"NANOVLLM_KERNELS": "auto", "NANOVLLM_MATMUL": "auto", "NANOVLLM_PDL": "1",
                                   "NANOVLLM_MATMUL_TABLE": ""}) == KernelOptions()


def test_the_triton_interpreter_turns_pdl_off():
    assert not KernelOptions.from_env({"TRITON_INTERPRET": "1"}).pdl
    assert KernelOptions.from_env({"TRITON_INTERPRET": "0"}).pdl


@pytest.mark.parametrize("name,value", [("NANOVLLM_KERNELS", "triton"), ("NANOVLLM_MATMUL", "Cublas"),
                                        ("NANOVLLM_PDL", "off"), ("NANOVLLM_HOPPER_FEATURES", "no"),
                                        ("NANOVLLM_NPU_GRAPH_MODE", "eager"), ("NANOVLLM_MPS_COMPILE", "yes"),
                                        ("NANOVLLM_ALLREDUCE", "custom")])
def test_a_bad_value_names_the_variable_and_the_value(name, value):
    with pytest.raises(ValueError, match=f"{name}={value!r}"):
        KernelOptions.from_env({name: value})


def test_options_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        KernelOptions().pdl = False


def test_current_options_default_to_the_environment_once(monkeypatch, restore_options):
    monkeypatch.setattr(opts, "_current", None)
    monkeypatch.setenv("NANOVLLM_KERNELS", "reference")
    first = current_options()
    assert first.reference_kernels
    monkeypatch.setenv("NANOVLLM_KERNELS", "auto")  # read once: later changes need a new platform or set_options
    assert current_options() is first


def test_set_options_installs_them(restore_options):
    mine = KernelOptions(triton_matmul=False)
    set_options(mine)
    assert current_options() is mine
    with pytest.raises(TypeError):
        set_options({"pdl": False})
