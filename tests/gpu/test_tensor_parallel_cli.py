"""Tensor parallelism's commands at two ranks (TP=2, NCCL) on two CUDA devices: each exits by itself and leaves no
process behind.  Marked ``gpu2`` and skipped, saying so, with fewer than two devices (tests/gpu/conftest.py):

    python -m pytest -q -m gpu2 tests/gpu/test_tensor_parallel_cli.py

* ``bench.py --tensor-parallel-size 2`` writes its JSON (it once printed its result and never exited);
* ``example.py --tensor-parallel-size 2`` prints a completion for each of its prompts;
* ``python -m nanovllm.precompile ... --tensor-parallel-size 2`` writes both ranks' compile-cache entries;
* ``python -m nanovllm.serve ... --tensor-parallel-size 2`` answers a chat request and ends on Ctrl-C (SIGINT to
  every process of its group, as a terminal sends it), within 60 s.
Every command carries a marker in its environment, which the processes it starts inherit: none may outlive it.
"""
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from conftest import processes_with, running
from serve_helpers import build_text_checkpoint, descendants, running_server

pytestmark = pytest.mark.gpu2

ROOT = Path(__file__).resolve().parents[2]
LIMIT_S = 300  # a cold compile of a tiny model at two ranks takes well under a minute
SMALL = ("--max-num-seqs", "4", "--max-model-len", "256", "--graph-batch-sizes", "4", "--prefill-graph-sizes", "512")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny random Qwen3 with a real (tiny) tokenizer and chat template (tests/serve_helpers.py)."""
    return build_text_checkpoint(tmp_path_factory.mktemp("text"))[0]


def gone_within(still_running, seconds: float) -> list[int]:
    """What ``still_running()`` (pids) still returns after up to ``seconds``: a worker may take a moment to end after
    rank 0's exit."""
    deadline = time.monotonic() + seconds
    while (left := still_running()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return left


def run_to_exit(tmp_path: Path, argv: list[str], **env) -> str:
    """Run ``argv`` from the repository root; assert it exits 0 within ``LIMIT_S`` and leaves no process; its
    stdout.  Output goes to files, not pipes: a process left behind holding a pipe would make reading it hang."""
    marker = f"NANOVLLM_TEST_CLI_RUN=tp2-{uuid.uuid4().hex}"
    name, value = marker.split("=")
    env = dict(os.environ, **env, **{name: value})
    with open(tmp_path / "stdout", "w") as stdout, open(tmp_path / "stderr", "w") as stderr:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=stdout, stderr=stderr)
        try:
            code = proc.wait(timeout=LIMIT_S)
        except subprocess.TimeoutExpired:
            code = None
            for pid in processes_with(marker):  # the command and what it started: none may outlive this test
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
            proc.wait()
    err, what = (tmp_path / "stderr").read_text()[-3000:], " ".join(argv[1:3])
    assert code == 0, f"{what}: exit status {code} (None: still running after {LIMIT_S} s); stderr:\n{err}"
    assert gone_within(lambda: processes_with(marker), 30) == [], f"processes of {what} still alive"
    return (tmp_path / "stdout").read_text()


def test_bench_writes_its_json_and_exits(tmp_path):
    out = tmp_path / "b.json"
    run_to_exit(tmp_path, [sys.executable, "bench.py", "--tensor-parallel-size", "2", "--bs", "16", "--num-seqs",
                           "16", "--max-input-len", "128", "--max-output-len", "128", "--json", str(out)])
    assert json.loads(out.read_text())["tok_per_s"] > 0


def test_example_prints_every_completion_and_exits(tmp_path, model):
    printed = run_to_exit(tmp_path, [sys.executable, "example.py", "--model", model, "--tensor-parallel-size", "2",
                                     "--device", "cuda", "--max-tokens", "8", *SMALL])
    assert printed.count("\nCompletion: ") == 4, printed[-2000:]  # example.py's four prompts


def test_precompile_writes_both_ranks_entries_and_exits(tmp_path, model):
    cache = tmp_path / "cache"
    run_to_exit(tmp_path, [sys.executable, "-m", "nanovllm.precompile", "--model", model, "--tensor-parallel-size",
                           "2", "--device", "cuda", *SMALL], NANOVLLM_CACHE_DIR=str(cache))
    manifests = list((cache / "compile").glob("*/manifest.json"))
    assert {json.loads(m.read_text())["fields"]["rank"] for m in manifests} == {0, 1}, manifests


def test_the_server_answers_and_ends_on_ctrl_c(tmp_path, model):
    httpx = pytest.importorskip("httpx")
    for module in ("fastapi", "uvicorn", "pydantic"):  # the `serve` extra (setup.py): carried as wheels to a GPU
        pytest.importorskip(module, reason=f"the server needs the `serve` extra; {module} is missing")
    with running_server(model, tmp_path, "--tensor-parallel-size", "2", "--device", "cuda", *SMALL) as base:
        r = httpx.post(base + "/v1/chat/completions", timeout=120,
                       json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None, r.text
        tree = [base.pid, *descendants(base.pid)]
        assert len(tree) >= 3, tree  # the server, its engine and the second rank at least
        for pid in tree:  # Ctrl-C reaches every process of the terminal's foreground group
            os.kill(pid, signal.SIGINT)
        left = gone_within(lambda: [p for p in tree if running(p)], 60)
        assert left == [], f"still running 60 s after Ctrl-C: {left}"
