"""bench.py without an engine (CPU only, fast): flag checks, the workload, token counting, the engine flags it
derives from ``EngineConfig``, the sweep's child command, the byte floor, and a run against a fake ``llm.engine``
that implements only the public API bench relies on."""
import os
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import bench  # noqa: E402
from benchmarks.common import decode_floor_seconds  # noqa: E402
from nanovllm.cli import engine_kwargs  # noqa: E402
from nanovllm.engine.engine import StepRecord  # noqa: E402

STATS = ("prefill_tokens", "prefill_time", "decode_tokens", "decode_time", "decode_steps", "prefill_steps",
         "host_time", "wait_time", "decode_kv_tokens", "decode_prepare_time", "preemptions")
DESCRIBE = {"device": "cpu", "device_type": "cpu", "dtype": "float32", "mode": "eager", "num_kv_blocks": 64,
            "kvcache_block_size": 64, "kv_bytes_per_token": 1024, "weight_bytes": 10**6, "graph_batch_sizes": [],
            "prefill_graph_sizes": [], "max_num_seqs": 4, "max_num_batched_tokens": 16384, "pipeline_depth": 3,
            "compile_cache": None, "step_origin": None, "init_phases": {"load": 0.1},
            "kernel_options": {"reference_kernels": True, "pdl": False}, "platform": "cpu"}


class FakeEngine:
    """The engine surface bench uses: stats, reset_stats, reset_prefix_cache, step_log, describe."""

    def __init__(self, short_by: int = 0):
        self.stats = {k: 7 for k in STATS}  # stale values that reset_stats must clear
        self.step_log = None
        self.calls = []
        self.short_by = short_by

    def reset_stats(self):
        self.calls.append("reset_stats")
        self.stats.update({k: 0 for k in STATS})

    def reset_prefix_cache(self):
        self.calls.append("reset_prefix_cache")

    def describe(self):
        return dict(DESCRIBE)


class FakeLLM:
    def __init__(self, model, short_by: int = 0, **kwargs):
        self.model, self.kwargs = model, kwargs
        self.engine = FakeEngine(short_by)
        self.closed = False

    def close(self):
        self.closed = True

    def generate(self, prompts, params, use_tqdm=True):
        params = params if isinstance(params, list) else [params] * len(prompts)
        s = self.engine.stats
        s.update(prefill_steps=1, prefill_time=0.25, decode_steps=10, decode_time=1.0, decode_tokens=20,
                 decode_kv_tokens=5000, host_time=0.5, wait_time=0.5, decode_prepare_time=0.01)
        if self.engine.step_log is not None:
            self.engine.step_log += [StepRecord("prefill", len(prompts), 0.0, 0.25, 0.0, 0.1),
                                     StepRecord("decode", len(prompts), 0.25, 0.1, 0.05, 0.01)]
        outs = [{"text": "", "token_ids": [1] * p.max_tokens} for p in params]
        outs[0]["token_ids"] = outs[0]["token_ids"][:len(outs[0]["token_ids"]) - self.engine.short_by]
        return outs


def parse(*argv):
    parser = bench.make_parser()
    args = parser.parse_args(list(argv))
    bench.check_args(parser, args)
    return args


@pytest.mark.parametrize("argv, message", [
    (["--max-input-len", "64"], "--max-input-len must be >= 100: nano-vllm's workload draws prompt lengths from "
                                "randint(100, max-input-len), got 64"),
    (["--max-output-len", "99"], "--max-output-len must be >= 100: nano-vllm's workload draws max_tokens"),
    (["--num-seqs", "0"], "--num-seqs must be >= 1, got 0"),
    (["--bs", "0"], "--bs must be >= 1, got 0"),
    (["--repeat", "0"], "--repeat must be >= 1, got 0"),
    (["--sweep-bs", "0,16"], "--sweep-bs must list batch sizes >= 1"),
    (["--plot", "x.png"], "--plot needs --sweep-bs"),
])
def test_flags_the_workload_cannot_take_exit_with_the_reason(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_the_shortest_lengths_allowed_give_a_workload():
    args = parse("--max-input-len", "100", "--max-output-len", "100", "--num-seqs", "1", "--bs", "1")
    prompts, params = bench.workload(args.num_seqs, args.max_input_len, args.max_output_len)
    assert [len(p) for p in prompts] == [100] and [p.max_tokens for p in params] == [100]


def test_the_default_workload_is_nano_vllms():
    prompts, params = bench.workload(256, 1024, 1024)
    assert sum(map(len, prompts)) == 142_827 and sum(p.max_tokens for p in params) == 133_966
    assert all(p.ignore_eos and p.temperature == 0.6 for p in params)


def test_tokens_counted_are_the_tokens_generated():
    params = [SimpleNamespace(max_tokens=3), SimpleNamespace(max_tokens=5)]
    assert bench.count_generated([{"token_ids": [1, 2, 3]}, {"token_ids": [4] * 5}], params) == 8
    with pytest.raises(bench.TokenCountMismatch, match="generated 7 tokens but the workload asks for 8"):
        bench.count_generated([{"token_ids": [1, 2, 3]}, {"token_ids": [4] * 4}], params)


def test_a_run_that_generates_fewer_tokens_fails_with_both_numbers(monkeypatch, tmp_path):
    monkeypatch.setattr(bench, "LLM", lambda model, **kw: FakeLLM(model, short_by=2, **kw))
    args = ["--model", str(tmp_path), "--num-seqs", "3", "--max-input-len", "100", "--max-output-len", "100"]
    with pytest.raises(SystemExit) as e:
        bench.main(args)
    assert e.value.code == "bench.py: the engine generated 298 tokens but the workload asks for 300 (sum of " \
                          "max_tokens, ignore_eos): the throughput would be wrong"


def test_a_run_uses_the_public_engine_api_and_reports_describe(monkeypatch, tmp_path, capsys):
    built = []
    monkeypatch.setattr(bench, "LLM", lambda model, **kw: built.append(FakeLLM(model, **kw)) or built[-1])
    results = bench.main(["--model", str(tmp_path), "--num-seqs", "3", "--max-input-len", "100",
                          "--max-output-len", "150", "--repeat", "2", "--json", str(tmp_path / "r.json")])
    engine = built[0].engine
    assert engine.calls == ["reset_stats", "reset_prefix_cache"] * 2 and engine.step_log is None
    _, params = bench.workload(3, 100, 150)
    r = results[0]
    assert r["tokens"] == sum(p.max_tokens for p in params) and r["tok_per_s"] > 0
    assert {k: r[k] for k in DESCRIBE} == DESCRIBE  # every describe() field, kernel_options included
    assert r["decode_steps"] == 10 and r["decode_step_ms"] == 100.0 and r["host_ms_per_step"] == round(500 / 11, 3)
    assert r["decode_floor_seconds"] is None and r["allocator"] == {}  # CPU: no copy bandwidth, no allocator
    assert r["prefill_step_ms"] == [250.0] and r["decode_by_batch"] == {"1-15": {"steps": 1, "seconds": 0.1}}
    out = capsys.readouterr().out
    assert out.count(f"Total: {r['tokens']}tok, Time: ") == 2 and "Throughput: " in out
    assert (tmp_path / "r.json").is_file() and built[0].closed  # closed before the copy-bandwidth test


def test_dummy_weights_without_model_use_the_synthesized_checkpoint(monkeypatch, tmp_path):
    built = []
    monkeypatch.setattr(bench, "default_model", lambda: str(tmp_path))
    monkeypatch.setattr(bench, "LLM", lambda model, **kw: built.append(FakeLLM(model, **kw)) or built[-1])
    bench.main(["--load-format", "dummy", "--num-seqs", "1", "--max-input-len", "100", "--max-output-len", "100"])
    assert built[0].model == str(tmp_path)
    assert built[0].kwargs == {"load_format": "dummy", "max_model_len": 4096, "max_num_seqs": 256}


def test_engine_flags_come_from_engine_config():
    flags = {a.dest for a in bench.make_parser()._actions}
    assert {"load_format", "pipeline_depth", "prefill_graph_sizes", "enforce_eager", "dtype", "device"} <= flags
    assert "max_num_seqs" not in flags  # --bs is bench's own
    args = parse("--bs", "48", "--graph-batch-sizes", "16,32,64", "--pipeline-depth", "2", "--enforce-eager")
    assert bench.llm_kwargs(args, args.bs) == {"max_model_len": 4096, "graph_batch_sizes": [16, 32],
                                               "pipeline_depth": 2, "enforce_eager": True, "max_num_seqs": 48}
    assert bench.llm_kwargs(args, 8)["graph_batch_sizes"] is None  # no bucket left: the engine's defaults


def test_the_sweep_child_gets_every_engine_flag_back():
    argv = ["--model", "/m", "--num-seqs", "9", "--max-input-len", "300", "--max-output-len", "200",
            "--enforce-eager", "--prefill-graph-sizes", "none", "--graph-batch-sizes", "8,16",
            "--load-format", "dummy", "--gpu-memory-utilization", "0.5", "--max-model-len", "2048",
            "--sweep-bs", "8,16"]
    args = parse(*argv)
    cmd = bench.child_argv(args, 16, "/tmp/out.json")
    assert cmd[:2] == [sys.executable, os.path.join(ROOT, "bench.py")]
    child = parse(*cmd[2:])
    assert engine_kwargs(child) == engine_kwargs(args)
    assert (child.model, child.bs, child.json, child.sweep_bs) == ("/m", 16, "/tmp/out.json", None)
    assert (child.num_seqs, child.max_input_len, child.max_output_len) == (9, 300, 200)
    assert engine_kwargs(parse(*bench.engine_argv({"enforce_eager": False}))) == {
        "enforce_eager": False, "max_model_len": 4096}


def test_decode_floor_is_weights_per_step_plus_kv_read_over_bandwidth():
    # ANCHORS.md's Qwen3-0.6B: 114,688 bytes of KV per token in bf16
    assert decode_floor_seconds(1000, 10**8, 1.2e9, 114_688, 3e12) == pytest.approx((1.2e12 + 114_688e8) / 3e12)
    with pytest.raises(ValueError, match="bandwidth must be positive"):
        decode_floor_seconds(1, 1, 1, 1, 0)
    stats = {k: 0 for k in STATS} | {"decode_steps": 10, "decode_time": 2.0, "decode_kv_tokens": 1000}
    r = bench.summarize(stats, 4.0, 100, 50, [])
    bench.add_floor(r, DESCRIBE, 1e9)
    floor = (10 * 10**6 + 1000 * 1024) / 1e9
    assert r["decode_floor_seconds"] == round(floor, 3) and r["decode_vs_floor"] == round(floor / 2.0, 3)
    assert r["copy_bandwidth_gbps"] == 1.0


def test_moe_step_reads_only_the_experts_its_tokens_were_routed_to():
    from benchmarks.common import step_weight_bytes
    assert step_weight_bytes(7, 1000) == 1000  # dense: every weight, every step
    # 600 of 1000 bytes are experts; one token routed to 2 of 8 experts reads a quarter of them
    assert step_weight_bytes(1, 1000, 600, 0.25) == pytest.approx(400 + 150)
    assert step_weight_bytes(2, 1000, 600, 0.25) == pytest.approx(400 + 600 * (1 - 0.75 ** 2))
    assert step_weight_bytes(256, 1000, 600, 8 / 128) == pytest.approx(1000, rel=1e-6)
    with pytest.raises(ValueError, match="expert_share=1.5"):
        step_weight_bytes(1, 1000, 600, 1.5)


def _maintained_programs() -> set[str]:
    return {f for f in os.listdir(os.path.join(ROOT, "benchmarks")) if f.endswith(".py") and f != "__init__.py"}


def test_docs_list_exactly_the_maintained_benchmarks():
    assert "docs/BENCHMARKS.md" in open(os.path.join(ROOT, "README.md")).read()
    section = open(os.path.join(ROOT, "docs", "BENCHMARKS.md")).read()
    listed = {line.split("`")[1] for line in section.splitlines() if line.startswith("- `")}
    assert listed == _maintained_programs()
    assert "python -m benchmarks.gpu" in section and "python -m pytest -q -m gpu tests/gpu" in section


def test_every_benchmark_program_imports():
    import importlib
    for name in sorted(_maintained_programs()):
        importlib.import_module(f"benchmarks.{name[:-3]}")
