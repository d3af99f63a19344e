"""benchmarks/offload_bench.py at a tiny size on the CPU: one row per batch size, the expert traffic and the floors
consistent with the host's share of the misses (0: every miss copied; 1: every miss computed on the host)."""
import json

import pytest

from conftest import build_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("mixtral"), "mixtral")


def run(checkpoint, out, share: float) -> list[dict]:
    from benchmarks import offload_bench
    result = offload_bench.main(["--model", checkpoint, "--load-format", "safetensors", "--device", "cpu",
                                 "--dtype", "float32", "--batch-sizes", "1,2", "--max-tokens", "4",
                                 "--prompt-len", "6", "--host-share", str(share), "--out", str(out)])
    assert result["expert_offload"]["expert_cache_bytes"] > 0
    assert "| batch | decode tok/s |" in (out / "offload_bench.md").read_text()
    rows = json.loads((out / "offload_bench.json").read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 2]
    assert all(r["decode_tokens"] == 3 * r["batch"] and 0 <= r["hit_rate"] <= 1 for r in rows)
    return rows


def test_copying_every_miss_fetches_the_missed_bytes(checkpoint, tmp_path):
    rows = run(checkpoint, tmp_path, 0.0)
    assert all(r["bytes_fetched_per_step"] > 0 and r["pct_of_floor"] > 0 for r in rows)  # 1 slot for top-2
    assert all(r["missed_bytes_per_step"] == r["bytes_fetched_per_step"] and r["splits_per_step"] == 0 for r in rows)
    assert all(0 < r["two_link_floor_ms"] < r["floor_step_ms"] for r in rows)  # the host's link lowers the floor
    assert all(r["host_ms_per_step"] == r["join_ms_per_step"] == 0 for r in rows)  # no host compute, no join


def test_computing_every_miss_on_the_host_fetches_nothing(checkpoint, tmp_path):
    rows = run(checkpoint, tmp_path, 1.0)
    assert all(r["bytes_fetched_per_step"] == 0 and r["host_computed_per_step"] > 0 for r in rows)
