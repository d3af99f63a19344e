"""benchmarks/serve_bench.py against a real server on a tiny checkpoint (tests/serve_helpers.py): Poisson arrivals
and the multi-turn workload, each request complete, the server's counters (prompt tokens, prefix-cache hits) as
the client reports them."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from serve_helpers import ROOT, build_text_checkpoint, metrics, running_server  # noqa: E402

KEY = "test-key"
ENGINE = dict(enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=512, max_model_len=512, max_num_seqs=8)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = build_text_checkpoint(tmp_path_factory.mktemp("serve"))
    with running_server(model[0], tmp_path_factory.mktemp("log"), "--served-model-name", "tiny", "--api-key", KEY,
                        **ENGINE) as base:
        yield base


@pytest.mark.slow
def test_serve_bench_runs_against_the_server(server, tmp_path):
    """benchmarks/serve_bench.py at a tiny scale: every request completes with exactly its max_tokens."""
    env = dict(os.environ, OUT=str(tmp_path), PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "serve_bench.py"), "--base-url", server,
                          "--api-key", KEY, "--request-rate", "8,inf", "--num-prompts", "6", "--min-input-len", "4",
                          "--max-input-len", "20", "--min-output-len", "4", "--max-output-len", "12",
                          "--max-token-id", "383"], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads((tmp_path / "serve_bench.json").read_text())
    assert [(r["completed"], r["failed"]) for r in result["runs"]] == [(6, 0), (6, 0)]
    assert all(r["ttft_ms"]["p50"] > 0 and r["output_throughput"] > 0 for r in result["runs"])


@pytest.mark.slow
def test_serve_bench_multi_turn_runs_against_the_server(server, tmp_path):
    """--multi-turn at a tiny scale: 3 conversations of 2 turns over a 40-token system prompt send 6 requests, each
    turn's prompt the previous one's plus its reply and the next user ids; the server took exactly those prompt
    tokens, and its prefix cache served some (the system prompt's and the first turns' full blocks)."""
    from benchmarks.serve_bench import conversations, make_parser
    flags = ["--multi-turn", "3,2", "--system-len", "40", "--turn-len", "6", "--reply-len", "4",
             "--max-token-id", "383", "--seed", "5"]
    convs = conversations(make_parser().parse_args(flags))
    assert [len(turns) for turns in convs] == [2, 2, 2]
    for (first, _, _), (second, max_tokens, _) in convs:
        assert second[:len(first)] == first and len(second) == len(first) + 4 + 6 and max_tokens == 4
        assert first[:40] == convs[0][0][0][:40] and len(first) == 46
    before = metrics(server)
    env = dict(os.environ, OUT=str(tmp_path), PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "benchmarks.serve_bench", "--base-url", server, "--api-key", KEY,
                          *flags], capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert run.returncode == 0, run.stdout + run.stderr
    after = metrics(server)
    result = json.loads((tmp_path / "serve_bench.json").read_text())
    [row] = result["runs"]
    assert result["num_prompts"] == 6 and (row["completed"], row["failed"]) == (6, 0)
    done = "nanovllm:request_success_total{length}"
    assert after[done] - before.get(done, 0) == 6
    sent = sum(len(prompt) for turns in convs for prompt, _, _ in turns)
    assert after["nanovllm:prompt_tokens_total"] - before["nanovllm:prompt_tokens_total"] == sent == 3 * (46 + 56)
    cache = row["prefix_cache"]
    assert cache["metrics"] == "nanovllm" and cache["queried_tokens"] == sent and cache["hit_rate"] > 0
    assert [len(t) for t in row["ttft_ms_by_turn"]] == [3, 3] and all(t["p50"] > 0 for t in row["ttft_ms_by_turn"])
    assert "prefix cache hit rate" in run.stdout
