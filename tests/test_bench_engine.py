"""bench.py end to end on the CPU against the real engine: a tiny random Qwen3 (vocabulary large enough for the
workload's token ids), eager, two sequences of the shortest lengths the workload allows; at one rank in this process,
and at two ranks as a command that must exit by itself."""
import json
import os
import subprocess
import sys

import pytest

from conftest import build_checkpoint, processes_with

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import bench  # noqa: E402

DESCRIBE_KEYS = {"device", "device_type", "dtype", "mode", "num_kv_blocks", "kvcache_block_size",
                 "kv_bytes_per_token", "weight_bytes", "graph_batch_sizes", "prefill_graph_sizes", "max_num_seqs",
                 "max_num_batched_tokens", "pipeline_depth", "compile_cache", "step_origin", "init_phases",
                 "kernel_options", "platform"}


def test_bench_counts_the_generated_tokens_and_reports_the_engine(tmp_path, capsys):
    model = build_checkpoint(tmp_path / "tiny", "qwen3", vocab_size=10240)
    out = tmp_path / "bench.json"
    bench.main(["--model", model, "--device", "cpu", "--enforce-eager", "--bs", "2", "--num-seqs", "2",
                "--max-input-len", "100", "--max-output-len", "110", "--max-model-len", "512",
                "--num-kvcache-blocks", "16", "--json", str(out)])
    r = json.loads(out.read_text())
    _, params = bench.workload(2, 100, 110)
    assert r["tokens"] == sum(p.max_tokens for p in params)
    assert DESCRIBE_KEYS <= set(r) and r["device_type"] == "cpu" and r["mode"] == "eager"
    assert r["max_num_seqs"] == 2 and isinstance(r["kernel_options"], dict)
    assert r["decode_steps"] > 0 and r["prefill_seconds"] > 0 and r["decode_floor_seconds"] is None
    assert sum(s["steps"] for s in r["decode_by_batch"].values()) > 0
    assert f"Total: {r['tokens']}tok, Time: " in capsys.readouterr().out


@pytest.mark.slow
def test_bench_at_two_ranks_writes_its_json_and_exits_leaving_no_process(tmp_path):
    """``bench.py --tensor-parallel-size 2`` as a user runs it, in a process of its own: it exits by itself (code 0)
    with its JSON written, rank 0's longest waits in it, and no process of the run left."""
    model = build_checkpoint(tmp_path / "tiny", "qwen3", vocab_size=10240)
    out = tmp_path / "bench.json"
    marker = f"NANOVLLM_TEST_RUN={tmp_path.name}"  # in the environment of the bench and all it starts
    env = dict(os.environ, NANOVLLM_TEST_RUN=tmp_path.name)
    cmd = [sys.executable, os.path.join(ROOT, "bench.py"), "--model", model, "--device", "cpu", "--enforce-eager",
           "--tensor-parallel-size", "2", "--bs", "2", "--num-seqs", "2", "--max-input-len", "100",
           "--max-output-len", "110", "--max-model-len", "512", "--num-kvcache-blocks", "16", "--json", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["tok_per_s"] > 0 and r["tp_timeout_s"] > 0 and r["tp_max_beat_gap_s"] >= 0
    left = processes_with(marker)
    assert left == [], f"processes of the run still alive: {left}"
