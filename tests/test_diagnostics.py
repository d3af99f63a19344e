"""The measuring tools: the engine's per-step log, the step plan and idle gaps of benchmarks/profile_run.py and
the dispatch-table merge of benchmarks/matmul_sweep.py (CPU only)."""
import json
import os
import sys

import pytest

from conftest import build_checkpoint
from nanovllm import LLM, SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # bench.py and the benchmarks package
    sys.path.insert(0, ROOT)


@pytest.fixture(scope="module")
def eager_llm(tmp_path_factory):
    return LLM(build_checkpoint(tmp_path_factory.mktemp("diag"), "qwen3"), enforce_eager=True, max_num_seqs=4,
               max_model_len=128)


def test_step_log_records_every_step_with_its_split(eager_llm):
    engine = eager_llm.engine
    engine.step_log = []
    try:
        eager_llm.generate([[1, 2, 3]] * 3 + [[4, 5, 6, 7, 8]], SamplingParams(max_tokens=5), use_tqdm=False)
        log = engine.step_log
    finally:
        engine.step_log = None
    # An engine step's wall time is charged to the oldest queued step: the prefill for the first ``depth`` steps
    # (which only queue steps) and the step after them (which waits for the prefill's tokens), then each decode.
    depth = engine.config.pipeline_depth
    kinds = [r.kind for r in log]
    assert kinds[:depth + 1] == ["prefill"] * (depth + 1) and set(kinds[depth + 1:]) == {"decode"}
    assert len(kinds) >= 6
    assert all(0 < r.seqs <= 4 for r in log) and log[0].seqs == 4
    assert all(b.start >= a.start + a.seconds for a, b in zip(log, log[1:]))
    for r in log:
        assert r.seconds > 0 and r.wait >= 0 and r.launch >= 0
        assert r.wait + r.launch <= r.seconds + 1e-6


def test_idle_gaps_are_charged_to_the_pair_of_kernel_kinds():
    from benchmarks.profile_run import idle_before
    events = [("nvjet_a", 0, 10), ("_decode_kernel", 12, 20), ("triton_poi_fused_x", 19, 25), ("nvjet_b", 30, 40)]
    other = "other (fused elementwise / norms / rope)"
    assert idle_before(events) == {("matmul", "attention"): 2, (other, "matmul"): 5}


def test_a_category_counts_its_overlapping_kernels_once():
    from benchmarks.profile_run import busy_by_category
    # the split-KV reduce made resident under PDL while the decode kernel still runs: attention is busy 0-25 once
    events = [("_decode_kernel", 0, 20), ("_decode_reduce_kernel", 10, 25), ("nvjet_a", 25, 40), ("nvjet_b", 50, 55)]
    assert busy_by_category(events) == {"attention": 25, "matmul": 20}


def test_matmul_table_merge_keeps_unswept_batch_sizes(tmp_path):
    from benchmarks.matmul_sweep import merge_table
    path = tmp_path / "table.json"
    cfg = {"block_m": 16, "block_n": 64, "block_k": 128, "split_k": 4, "swap": True, "num_warps": 4,
           "num_stages": 4}
    merge_table(str(path), "9.0", {"1024,2048,0": [[16, cfg], [64, None], [256, None]]})
    merge_table(str(path), "9.0", {"1024,2048,0": [[64, dict(cfg, block_m=32)], [128, None]]})
    rows = json.loads(path.read_text())["arch"]["9.0"]["1024,2048,0"]
    assert rows == [[16, cfg], [64, dict(cfg, block_m=32)], [128, None], [256, None]]


def test_profile_plan_reads_what_each_step_launched_from_the_stats():
    from benchmarks.profile_run import Launch, launched
    zero = dict.fromkeys(("prefill_steps", "prefill_tokens", "decode_steps", "decode_tokens", "decode_kv_tokens"), 0)
    assert launched(zero, dict(zero, prefill_steps=1, prefill_tokens=700)) == Launch("prefill", 700, 0)
    assert launched(zero, dict(zero, decode_steps=1, decode_tokens=64, decode_kv_tokens=9000)) == \
        Launch("decode", 64, 9000)
    assert launched(zero, zero) == Launch(None, 0, 0)


def test_profile_windows_start_where_the_batch_first_fits_and_never_overlap():
    from benchmarks.profile_run import Launch, plan_windows
    plan = [Launch("prefill", 900, 0)] * 3 + [Launch("decode", n, 10 * n) for n in (8, 8, 8, 7, 7, 5, 3, 3, 2, 1)]
    assert plan_windows(plan, [8, 4, 7, 1], 2, prefill=True) == [
        ("prefill", 0, 3), ("decode <=8", 3, 5), ("decode <=7", 6, 8), ("decode <=4", 9, 11), ("decode <=1", 12, 13)]
    assert plan_windows(plan, [0], 2, prefill=False) == []


def test_profile_step_loop_runs_the_workload_through_the_public_engine_api(eager_llm):
    from benchmarks.profile_run import run_steps
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in (3, 5)]
    seen = []
    plan = run_steps(eager_llm.engine, [[1, 2, 3], [4, 5, 6, 7]], params, lambda i, phase: seen.append((i, phase)))
    assert plan[0].kind == "prefill" and plan[0].size == 7
    decode = [s for s in plan if s.kind == "decode"]
    assert [s.size for s in decode] == [2, 2, 1, 1] and all(s.kv_tokens > 0 for s in decode)
    assert seen[:2] == [(0, "start"), (0, "end")] and len(seen) == 2 * len(plan)
