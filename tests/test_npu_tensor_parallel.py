"""Tensor parallelism on the NPU platform, on the CPU: ``LLM(path, device="npu", tensor_parallel_size=2)`` over the
stand-in ``hccl`` backend (``standins/hccl.py``, gloo underneath) gives the CPU platform's TP=1 greedy float32
tokens in eager mode and in both torchair modes; the platforms name the backend (hccl, nccl, gloo) and the rank's
device; the stand-in's ProcessGroupHCCL checks refuse what HCCL refuses.

The spawned rank is a fresh interpreter: ``standins/site/sitecustomize.py`` installs the stand-ins there
(``NANOVLLM_TEST_STANDINS=npu`` on its ``PYTHONPATH``).  No Ascend card ran this (see ``standins/host_device.py``).
"""
import os

import pytest
import torch
import torch.distributed as dist

from conftest import build_checkpoint, free_port
from nanovllm import LLM, SamplingParams
from nanovllm.kernels.options import current_options, set_options
from standins import hccl, install_npu, torchair

pytestmark = [pytest.mark.platform, pytest.mark.slow]

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
ENGINE = dict(num_kvcache_blocks=24, kvcache_block_size=16, max_model_len=128, max_num_seqs=4,
              graph_batch_sizes=[4], dtype="float32")
SITE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "standins", "site")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import transformers  # noqa: F401  (before torch_npu is importable: accelerate probes for it on import)
    return build_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.fixture(scope="module")
def cpu_tokens(model_dir):
    """Greedy float32 tokens of the CPU platform at TP=1, eager."""
    llm = LLM(model_dir, device="cpu", enforce_eager=True, **ENGINE)
    return [o["token_ids"] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.fixture
def npu(monkeypatch, tmp_path):
    saved = current_options()
    monkeypatch.setenv("NANOVLLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("NANOVLLM_TEST_STANDINS", "npu")  # the spawned rank installs the stand-ins too
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([SITE, os.environ.get("PYTHONPATH", "")]))
    torchair.stats.update(graphs=[], cache_saves=0, cache_loads=0, traces=0)
    hccl.stats.update(allreduce=0, allgather=0, broadcast=0, barrier=0)
    yield install_npu(monkeypatch)
    set_options(saved)


def _two_ranks(model_dir, **kw):
    """(tokens, the backend of the default group, rank 0's device) of a TP=2 LLM on the NPU, closed after."""
    llm = LLM(model_dir, device="npu", tensor_parallel_size=2, **{**ENGINE, **kw})
    try:
        tokens = [o["token_ids"] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
        return tokens, dist.get_backend(), llm.engine.platform.device, llm.engine.describe()
    finally:
        llm.close()


def test_npu_tp2_eager_gives_the_cpu_tokens_over_hccl(npu, model_dir, cpu_tokens):
    tokens, backend, device, d = _two_ranks(model_dir, enforce_eager=True)
    assert tokens == cpu_tokens
    assert backend == "hccl" and device == torch.device("npu", 0) and d["mode"] == "eager"
    assert hccl.stats["allreduce"] > 0 and hccl.stats["allgather"] > 0  # rank 0's collectives went through hccl
    assert not dist.is_initialized()


@pytest.mark.parametrize("mode", ["max-autotune", "reduce-overhead"])
def test_npu_tp2_graph_modes_give_the_cpu_tokens_with_functional_collectives(npu, model_dir, cpu_tokens,
                                                                            monkeypatch, mode):
    monkeypatch.setenv("NANOVLLM_NPU_GRAPH_MODE", mode)  # the spawned rank reads it too
    tokens, backend, _, d = _two_ranks(model_dir)
    assert tokens == cpu_tokens and backend == "hccl"
    assert d["mode"] == "graph" and d["kernel_options"]["npu_graph_mode"] == mode
    graphs = torchair.stats["graphs"]
    assert [g["mode"] for g in graphs] == [mode]  # the one decode bucket, compiled by torchair
    ops = graphs[0]["ops"]
    layers = 2
    # one all-reduce after attention and one after the MLP per layer, one gather of the logits, each waited on
    assert ops.count("_c10d_functional::all_reduce") == 2 * layers
    assert ops.count("_c10d_functional::all_gather_into_tensor") == 1
    assert ops.count("_c10d_functional::wait_tensor") == 2 * layers + 1
    assert not any(op.startswith("nanovllm::") for op in ops)


def test_npu_platforms_name_the_backend_and_the_rank_device(npu, model_dir):
    from nanovllm.platforms import platform_class
    from nanovllm.platforms.cpu import CpuPlatform
    from nanovllm.platforms.cuda import CudaPlatform
    npu_class = platform_class("npu")
    assert (npu_class.distributed_backend, CudaPlatform.distributed_backend, CpuPlatform.distributed_backend) == \
        ("hccl", "nccl", "gloo")
    assert npu_class.rank_device("npu", 1) == "npu:1" and CudaPlatform.rank_device("auto", 3) == "cuda:3"
    assert CpuPlatform.rank_device("cpu", 1) == "cpu" and CpuPlatform.visible_device_count() is None
    from standins import npu_runtime
    try:
        npu_class.bind_rank("npu:1")
        assert npu_runtime.stats["current_device"] == 1 and npu_class.visible_device_count() == npu_runtime.DEVICES
    finally:
        npu_class.bind_rank("npu:0")  # the stand-in's current device outlives the test: later tests expect npu:0
    with pytest.raises(ValueError, match=r"tensor_parallel_size=3 is more than the 2 visible npu devices"):
        LLM(model_dir, device="npu", tensor_parallel_size=3)


def test_the_npu_hccl_stand_in_refuses_what_processgrouphccl_refuses(npu):
    port = free_port()
    dist.init_process_group("hccl", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        x = torch.arange(6, dtype=torch.float32).view(2, 3).to("npu")
        dist.all_reduce(x)
        assert x.device.type == "npu" and torch.equal(x.cpu(), torch.arange(6, dtype=torch.float32).view(2, 3))
        with pytest.raises(RuntimeError, match="Tensors must be NPU and dense"):
            dist.all_reduce(torch.ones(3))
        with pytest.raises(RuntimeError, match="Tensors must be contiguous"):
            dist.all_reduce(x.t())
        with pytest.raises(RuntimeError, match="Unsupported data type for HCCL process group"):
            dist.all_reduce(torch.ones(3, dtype=torch.uint32).to("npu"))
    finally:
        dist.destroy_process_group()
