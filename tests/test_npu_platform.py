"""The NPU platform end to end on the CPU, against the stand-ins of torch_npu and torchair (``tests/standins``):
same greedy tokens as the CPU platform in eager mode and in both torchair modes, on "npu" tensors, through the
documented vendor calls; torchair's cache beside ours; the platform's device, memory and version facts.

No Ascend card ran this.  What it proves is nanovllm's side of the contract (see ``standins/host_device.py``).
"""
import collections

import pytest
import torch

from conftest import build_checkpoint
from nanovllm import LLM, SamplingParams
from nanovllm.kernels.options import current_options, set_options
from standins import install_npu, npu_ops, npu_runtime, torchair

pytestmark = pytest.mark.platform

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
ENGINE = dict(num_kvcache_blocks=24, kvcache_block_size=16, max_model_len=128, max_num_seqs=4,
              graph_batch_sizes=[2, 4])


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    import transformers  # noqa: F401  (before torch_npu is importable: accelerate probes for it on import)
    return build_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.fixture(scope="module")
def cpu_tokens(model_dir):
    """Greedy tokens of the CPU platform (eager), per dtype."""
    return {dtype: [o["token_ids"] for o in LLM(model_dir, device="cpu", dtype=dtype, enforce_eager=True, **ENGINE)
                    .generate(PROMPTS, GREEDY, use_tqdm=False)] for dtype in ("bfloat16", "float32")}


@pytest.fixture
def npu(monkeypatch, tmp_path):
    saved = current_options()
    monkeypatch.setenv("NANOVLLM_CACHE_DIR", str(tmp_path / "cache"))
    npu_ops.calls.clear()
    torchair.stats.update(graphs=[], cache_saves=0, cache_loads=0, traces=0)
    yield install_npu(monkeypatch)
    set_options(saved)


def _run(model_dir, **kw):
    llm = LLM(model_dir, device="npu", **{**ENGINE, **kw})
    return llm, [o["token_ids"] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_npu_eager_gives_the_cpu_tokens_through_fia_and_scatter(npu, model_dir, cpu_tokens):
    llm = LLM(model_dir, device="npu", enforce_eager=True, gpu_memory_utilization=0.12,
              **{k: v for k, v in ENGINE.items() if k != "num_kvcache_blocks"})
    tokens = [o["token_ids"] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert tokens == cpu_tokens["bfloat16"]
    runner = llm.engine.runner
    budget = llm.engine.platform.available_kv_bytes(0.12)  # torch.npu.mem_get_info and the allocator's statistics
    cfg = llm.config  # the probe's temporary cache (its prefill's sequences of max_model_len) counts as free
    seq_len = min(cfg.max_model_len, cfg.max_num_batched_tokens)
    probe_seqs = max(1, min(cfg.max_num_seqs, cfg.max_num_batched_tokens // seq_len))
    probe_blocks = probe_seqs * -(-seq_len // runner.block_size)
    assert runner.num_blocks == budget // runner.kv_spec.bytes_per_block + probe_blocks
    assert npu_runtime.stats["peak_resets"] > 0
    assert runner.kv_caches[0][0].device == torch.device("npu", 0) and runner.token_buffer.device.type == "npu"
    assert next(runner.model.parameters()).device.type == "npu" and runner.dtype == torch.bfloat16
    calls = collections.Counter(npu_ops.calls)
    layers, decode_steps = 2, GREEDY.max_tokens - 1
    assert calls["npu_fused_infer_attention_score"] == layers * decode_steps  # prefill: the twin
    # K and V, every step, and once in the probe prefill that sized the KV cache
    assert calls["npu_scatter_nd_update_"] == 2 * layers * (GREEDY.max_tokens + 1)


@pytest.mark.parametrize("mode", ["max-autotune", "reduce-overhead"])
@pytest.mark.slow
def test_npu_graph_modes_give_the_cpu_tokens_with_only_convertible_ops(npu, model_dir, cpu_tokens, monkeypatch, mode):
    monkeypatch.setenv("NANOVLLM_NPU_GRAPH_MODE", mode)
    llm, tokens = _run(model_dir)
    assert tokens == cpu_tokens["bfloat16"]
    d = llm.engine.describe()
    assert d["mode"] == "graph" and d["kernel_options"]["npu_graph_mode"] == mode and d["compile_cache"] == "miss"
    graphs = torchair.stats["graphs"]
    assert [g["mode"] for g in graphs] == [mode, mode]  # one static graph per bucket, nothing else compiled
    ops = set().union(*(g["ops"] for g in graphs))
    assert not any(op.startswith("nanovllm::") or "invoke_subgraph" in op for op in ops)
    assert "auto_functionalized_v2" in ops  # the in-place KV store, functionalized as torchair expects
    fia = "air::npu_fused_infer_attention_score"
    assert (fia in ops) == (mode == "max-autotune")
    calls = collections.Counter(npu_ops.calls)
    layers, runs = 2, 2 * 2 + GREEDY.max_tokens - 1  # each bucket run twice at start-up, then every decode step
    assert calls["air.npu_fused_infer_attention_score"] == (layers * runs if mode == "max-autotune" else 0)
    assert torchair.stats["cache_saves"] == 2


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory):
    """(checkpoint dir, CPU eager bfloat16 tokens) of a tiny Qwen3-MoE."""
    import transformers  # noqa: F401  (before torch_npu is importable, as above)
    path = build_checkpoint(tmp_path_factory.mktemp("qwen3_moe"), "qwen3_moe")
    return path, [o["token_ids"] for o in LLM(path, device="cpu", dtype="bfloat16", enforce_eager=True, **ENGINE)
                  .generate(PROMPTS, GREEDY, use_tqdm=False)]


def test_npu_max_autotune_runs_an_moe_model_with_only_convertible_ops(moe_model, npu, monkeypatch):
    """The fused MoE op reaches torchair as plain torch ops (its twin traced), not as an opaque nanovllm op."""
    path, want = moe_model
    monkeypatch.setenv("NANOVLLM_NPU_GRAPH_MODE", "max-autotune")
    llm, tokens = _run(path, graph_batch_sizes=[4])
    assert tokens == want and llm.engine.describe()["mode"] == "graph"
    ops = set().union(*(g["ops"] for g in torchair.stats["graphs"]))
    assert ops and not any(op.startswith("nanovllm::") for op in ops)


def test_npu_warm_start_hits_our_cache_and_torchairs(npu, model_dir, cpu_tokens):
    first, _ = _run(model_dir, graph_batch_sizes=[4])
    assert first.engine.describe()["compile_cache"] == "miss"
    entry = first.engine.runner.executor.cache.entry
    saved = [p.relative_to(entry).parts for p in (entry / "platform").rglob("compiled_module")]
    assert len(saved) == 1 and saved[0][-2] == "decode_4"  # torchair's file for the bucket, inside our entry
    second, tokens = _run(model_dir, graph_batch_sizes=[4])
    assert tokens == cpu_tokens["bfloat16"]
    assert second.engine.describe()["compile_cache"] == "hit" and torchair.stats["cache_loads"] == 1


def test_npu_float32_runs_the_twins(npu, model_dir, cpu_tokens):
    _, tokens = _run(model_dir, dtype="float32", enforce_eager=True)
    assert tokens == cpu_tokens["float32"]
    assert "npu_fused_infer_attention_score" not in npu_ops.calls  # FIA takes float16/bfloat16 only


def test_npu_without_the_compile_cache_compiles_through_get_npu_backend(npu, model_dir, cpu_tokens, monkeypatch):
    monkeypatch.setenv("NANOVLLM_DISABLE_COMPILE_CACHE", "1")
    llm, tokens = _run(model_dir, graph_batch_sizes=[4])
    assert tokens == cpu_tokens["bfloat16"] and llm.engine.describe()["compile_cache"] == "off"
    assert len(torchair.stats["graphs"]) == 1 and torchair.stats["cache_saves"] == 0


def test_npu_prefill_graph_sizes_are_refused(npu, model_dir):
    with pytest.raises(ValueError, match=r"prefill_graph_sizes=\[64\]"):
        LLM(model_dir, device="npu", prefill_graph_sizes=[64], **ENGINE)


def test_npu_platform_facts(npu, monkeypatch):
    from nanovllm.platforms import get_platform, resolve_device
    assert resolve_device("auto") == "npu"
    platform = get_platform("npu:1")
    assert platform.device == torch.device("npu", 1) and npu_runtime.stats["current_device"] == 1
    assert platform.distributed_backend == "hccl" and platform.static_shapes and platform.measures_memory
    assert platform.arch() == npu_runtime.DEVICE_NAME
    assert platform.versions() == {"cann": npu_runtime.CANN_VERSION, "torch_npu": npu_runtime.TORCH_NPU_VERSION,
                                   "torchair": "0.0.standin"}
    used_by_others = npu_runtime.TOTAL_BYTES - npu_runtime.FREE_BYTES - npu_runtime.stats["memory_reserved"]
    assert platform.available_kv_bytes(0.5) == int(npu_runtime.TOTAL_BYTES * 0.5 - used_by_others
                                                   - npu_runtime.stats["max_memory_allocated"])
    assert platform.resolve_dtype("auto", "float16") == torch.float16
    assert platform.resolve_dtype("auto", "float32") == torch.bfloat16
    platform.record_event().synchronize()
    waits = npu_runtime.stats["stream_waits"]
    with platform.beside():  # copies on a stream of its own; the current stream waits for them afterwards
        side = platform.device_api().current_stream(platform.device)
    assert side is platform._side and npu_runtime.stats["stream_waits"] == waits + 1
    assert platform.device_api().current_stream(platform.device) is not side
    with pytest.raises(ValueError, match="'npu:7'"):
        get_platform("npu:7")
    with pytest.raises(ValueError, match="NANOVLLM_NPU_GRAPH_MODE='npugraph'"):
        monkeypatch.setenv("NANOVLLM_NPU_GRAPH_MODE", "npugraph")
        get_platform("npu")


def test_without_torch_npu_the_npu_is_an_error_and_auto_skips_it():
    from nanovllm.platforms import get_platform, resolve_device
    assert resolve_device("auto") in ("cpu", "cuda")
    with pytest.raises(ValueError, match="device='npu'.*torch_npu is not installed"):
        get_platform("npu")


@pytest.mark.slow
def test_npu_logprobs_compile_one_static_variant_per_bucket_when_asked(npu, model_dir):
    """The logprobs variant is a static graph of its own per bucket, compiled when a batch of that bucket first
    asks for logprobs, with only convertible ops, cached in an entry of its own; its logprobs are the CPU's."""
    asked = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=3)
    llm, _ = _run(model_dir)
    assert len(torchair.stats["graphs"]) == 2  # the plain buckets; GREEDY asked for no logprobs
    got = llm.generate(PROMPTS, asked, use_tqdm=False)
    ex = llm.engine.runner.executor
    assert len(torchair.stats["graphs"]) == 3 and ex.variant_graph_sizes("logprobs") == [4]
    entry = ex.variant_graphs["logprobs"].caches[4].entry
    assert entry != ex.cache.entry and [p.parts[-2] for p in entry.rglob("compiled_module")] == ["decode_logprobs_4"]
    want = LLM(model_dir, device="cpu", dtype="bfloat16", enforce_eager=True, **ENGINE).generate(
        PROMPTS, asked, use_tqdm=False)
    for g, w in zip(got, want):
        assert g["token_ids"] == w["token_ids"]
        for a, b in zip(g["logprobs"], w["logprobs"], strict=True):
            assert list(a) == list(b)
            assert list(a.values()) == pytest.approx(list(b.values()), abs=1e-5)
