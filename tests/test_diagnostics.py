"""The measuring tools: the engine's per-step log, the slow-step analysis of benchmarks/host_stalls.py, the idle
gaps of benchmarks/profile_run.py and the dispatch-table merge of benchmarks/matmul_sweep.py (CPU only)."""
import json
import os
import sys

import pytest

from conftest import build_checkpoint
from nanovllm import LLM, SamplingParams

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "benchmarks")):  # bench.py, and the benchmarks' own `from common import`
    if path not in sys.path:
        sys.path.insert(0, path)


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


def _synthetic_log(slow: range, gc_at: int) -> dict:
    """100 decode steps of 5 ms (4 ms waiting, 0.8 ms launching), except ``slow`` ones whose launch takes 8 ms
    while the device idles (no wait), with one garbage collection inside step ``gc_at``."""
    steps, t = [], 0.0
    for i in range(100):
        wait, launch = (0.0, 8.0) if i in slow else (4.0, 0.8)
        ms = wait + launch + 0.2
        steps.append(["decode", 64, t, ms, wait, launch])
        t += ms + 0.05
    return {"fields": ["kind", "seqs", "start_ms", "ms", "wait_ms", "launch_ms"], "steps": steps,
            "gc": [[steps[gc_at][2] + 1.0, 0, 6.5]]}


def test_slow_clusters_find_a_host_stall_and_blame_the_launch():
    from host_stalls import slow_clusters
    clusters = slow_clusters(_synthetic_log(range(40, 43), gc_at=41))
    assert len(clusters) == 1
    c = clusters[0]
    assert c["steps"] == 3 and c["seqs"] == "64-64"
    assert c["extra_ms"]["launch"] == pytest.approx(3 * 7.2, abs=0.01)
    assert c["extra_ms"]["wait"] == pytest.approx(-3 * 4.0, abs=0.01)
    assert c["gc_ms"] == 6.5
    assert slow_clusters(_synthetic_log(range(0), gc_at=5)) == []


def test_step_log_json_round_trips_through_the_analysis(eager_llm):
    import bench
    from host_stalls import step_table
    engine = eager_llm.engine
    engine.step_log = []
    try:
        eager_llm.generate([[1, 2, 3]] * 2, SamplingParams(max_tokens=4), use_tqdm=False)
        log = engine.step_log
    finally:
        engine.step_log = None
    data = json.loads(json.dumps(bench.step_log_json(log, [(log[1].start, 0, 0.001)], log[0].start)))
    cols = step_table(data)
    assert list(cols["kind"]) == [r.kind for r in log]
    assert cols["start_ms"][0] == 0.0 and (cols["after_ms"] >= -1e-3).all()
    assert data["gc"] == [[round(1000 * (log[1].start - log[0].start), 3), 0, 1.0]]


def test_idle_gaps_are_charged_to_the_pair_of_kernel_kinds():
    from profile_run import idle_before
    events = [("nvjet_a", 0, 10), ("_decode_kernel", 12, 20), ("triton_poi_fused_x", 19, 25), ("nvjet_b", 30, 40)]
    other = "other (fused elementwise / norms / rope)"
    assert idle_before(events) == {("matmul", "attention"): 2, (other, "matmul"): 5}


def test_matmul_table_merge_keeps_unswept_batch_sizes(tmp_path):
    from matmul_sweep import merge_table
    path = tmp_path / "table.json"
    cfg = {"block_m": 16, "block_n": 64, "block_k": 128, "split_k": 4, "swap": True, "num_warps": 4,
           "num_stages": 4}
    merge_table(str(path), "9.0", {"1024,2048,0": [[16, cfg], [64, None], [256, None]]})
    merge_table(str(path), "9.0", {"1024,2048,0": [[64, dict(cfg, block_m=32)], [128, None]]})
    rows = json.loads(path.read_text())["arch"]["9.0"]["1024,2048,0"]
    assert rows == [[16, cfg], [64, dict(cfg, block_m=32)], [128, None], [256, None]]


def test_free_block_order_for_the_placement_experiments():
    from host_stalls import order_free_blocks
    from nanovllm.engine.block_manager import BlockManager
    bm = BlockManager(16, 4)
    bm.free_blocks.move_to_end(0)  # as a finished run leaves it: not in id order
    order_free_blocks(bm, "keep", 0)
    assert list(bm.free_blocks)[-1] == 0
    order_free_blocks(bm, "shuffle", 3)
    shuffled = list(bm.free_blocks)
    assert sorted(shuffled) == list(range(16)) and shuffled != list(range(16))
    order_free_blocks(bm, "ascending", 0)
    assert list(bm.free_blocks) == list(range(16))
    assert bm._take_free_block() == 0


def test_injected_stalls_hit_every_nth_decode_launch_only():
    from types import SimpleNamespace

    from host_stalls import stalling_schedule
    batches = iter([SimpleNamespace(seqs=[1], is_prefill=True)] + [SimpleNamespace(seqs=[1], is_prefill=False)] * 7
                   + [SimpleNamespace(seqs=[], is_prefill=False)] * 3)
    scheduler = SimpleNamespace(schedule=lambda: next(batches))
    injected = []
    schedule = stalling_schedule(scheduler, 2.0, 3, injected)
    for _ in range(11):
        schedule()
    assert len(injected) == 2 and all(ms >= 2.0 for ms in injected)  # the 3rd and 6th decode batches


@pytest.mark.parametrize("bad", ["8", "8,", "x,40", "8,4.5", "0,40", "8,0", "8,40,2"])
def test_inject_stall_option_rejects_bad_values_clearly(bad):
    import argparse

    from host_stalls import stall_spec
    assert stall_spec("8,40") == (8.0, 40) and stall_spec("2.5,1") == (2.5, 1)
    with pytest.raises(argparse.ArgumentTypeError, match="MS"):
        stall_spec(bad)
