"""The MPS platform against the stand-in of ``torch.mps`` (``tests/standins/mps.py``): eager by default with the
CPU platform's greedy tokens, compiling only when asked (with a warning), float16 by default and bfloat16 only
where macOS has it, the KV cache sized from the documented memory queries, one device only.

No Mac ran this, and the tensors stay on the CPU (a CPU-only PyTorch cannot hold "mps" tensors; ``standins/mps.py``
says why): what is proven is the platform's side, not Metal and not MPSInductor.
"""
import contextlib
import logging

import pytest
import torch

from conftest import build_checkpoint
from nanovllm import LLM, SamplingParams
from nanovllm.kernels.options import current_options, set_options
from standins import install_mps

pytestmark = pytest.mark.platform

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [20, 21, 22, 23, 24, 25, 26, 27]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
ENGINE = dict(kvcache_block_size=16, max_model_len=128, max_num_seqs=4, graph_batch_sizes=[4])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("llama"), "llama")


@pytest.fixture(scope="module")
def cpu_tokens(model_dir):
    llm = LLM(model_dir, device="cpu", dtype="float16", enforce_eager=True, num_kvcache_blocks=24, **ENGINE)
    return [o["token_ids"] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


@pytest.fixture
def mps(monkeypatch, tmp_path):
    saved = current_options()
    monkeypatch.setenv("NANOVLLM_CACHE_DIR", str(tmp_path / "cache"))
    yield install_mps(monkeypatch)
    set_options(saved)


@contextlib.contextmanager
def _captured(caplog):
    """The package logger does not propagate to the root logger, where caplog listens: hand it caplog's handler."""
    log = logging.getLogger("nanovllm")
    log.addHandler(caplog.handler)
    try:
        yield
    finally:
        log.removeHandler(caplog.handler)


def _tokens(llm):
    return [o["token_ids"] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_mps_runs_eagerly_by_default_with_the_cpu_tokens(mps, model_dir, cpu_tokens, caplog):
    with _captured(caplog):
        llm = LLM(model_dir, device="mps", **ENGINE)
    assert llm.engine.platform.name == "mps" and llm.engine.describe()["mode"] == "eager"
    assert "mps platform runs eagerly by default" in caplog.text
    assert llm.engine.runner.dtype == torch.float16
    # The KV cache: recommended_max_memory * utilization - driver_allocated_memory, in whole blocks, plus the
    # probe's temporary cache (max_num_seqs sequences of max_model_len; the stand-in's driver memory is constant)
    budget = int(mps.RECOMMENDED_BYTES * 0.92 - mps.DRIVER_BYTES)
    runner = llm.engine.runner
    assert runner.num_blocks == budget // runner.kv_spec.bytes_per_block + 4 * 128 // runner.block_size
    assert _tokens(llm) == cpu_tokens
    assert mps.stats["events_recorded"] > 0 and mps.stats["empty_cache"] > 0


def test_mps_compiles_only_when_asked_and_warns(mps, model_dir, cpu_tokens, monkeypatch, caplog):
    from nanovllm.platforms.mps import MpsPlatform
    # MPSInductor cannot run here; Dynamo's "eager" backend keeps the executor path (one trace, buckets, no
    # capture, no recompile) and the compiled step's tokens checkable.
    monkeypatch.setattr(MpsPlatform, "compile_backend", "eager")
    monkeypatch.setenv("NANOVLLM_MPS_COMPILE", "1")
    with _captured(caplog):
        llm = LLM(model_dir, device="mps", num_kvcache_blocks=24, **ENGINE)
    assert "MPSInductor, which has reported silent wrong results" in caplog.text
    d = llm.engine.describe()
    assert d["mode"] == "graph" and d["kernel_options"]["mps_compile"] and d["prefill_graph_sizes"] == []
    assert _tokens(llm) == cpu_tokens


def test_mps_dtypes_follow_the_os(mps, monkeypatch):
    from nanovllm.platforms import get_platform
    platform = get_platform("mps")
    assert platform.resolve_dtype("auto", "bfloat16") == torch.float16
    assert platform.resolve_dtype("bfloat16", None) == torch.bfloat16  # macOS 15
    install_mps(monkeypatch, macos=(13, 6))
    with pytest.raises(ValueError, match="dtype='bfloat16' needs macOS 14"):
        get_platform("mps").resolve_dtype("bfloat16", None)


def test_mps_is_one_device_and_auto_picks_it(mps):
    from nanovllm.platforms import get_platform, resolve_device
    if not torch.cuda.is_available():
        assert resolve_device("auto") == "mps"
    platform = get_platform("mps")
    assert not platform.supports_graph_capture and not platform.static_shapes
    with pytest.raises(ValueError, match="tensor_parallel_size=2"):
        platform.check_tensor_parallel(2)
    platform.check_tensor_parallel(1)


def test_without_mps_asking_for_it_is_an_error():
    from nanovllm.platforms import get_platform
    with pytest.raises(ValueError, match="device='mps'.*is_available"):
        get_platform("mps")
