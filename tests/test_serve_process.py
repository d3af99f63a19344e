"""The server's engine in a process of its own (``entrypoints/engine_process.py``): an engine that fails to build
ends the command with its error; an engine process that dies fails its requests and the health check while the
server stays up; Ctrl-C (SIGINT to the whole process group) leaves no process behind."""
import os
import signal
import subprocess
import sys
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from serve_helpers import ROOT, alive, build_text_checkpoint, descendants, running_server  # noqa: E402

pytestmark = pytest.mark.slow

ENGINE = dict(enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=256)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_text_checkpoint(tmp_path_factory.mktemp("serve_process"))[0]


def engine_process(server_pid: int) -> int:
    """The engine process: the server's child that runs ``engine_process.main`` (not the resource tracker)."""
    for pid in descendants(server_pid):
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            cmdline = f.read().replace(b"\0", b" ").decode()
        if "multiprocessing.spawn" in cmdline and "resource_tracker" not in cmdline:
            return pid
    raise AssertionError(f"no engine process under {server_pid}")


def greedy(base: str, prompt) -> str:
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)
    return client.completions.create(model=base.model, prompt=prompt, temperature=0, max_tokens=10,
                                     extra_body={"ignore_eos": True}).choices[0].text


def test_an_engine_that_fails_to_build_ends_the_command_with_its_error(model):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    # 4 query heads do not split over 3 ranks: LLM(...) raises in the engine process
    done = subprocess.run([sys.executable, "-m", "nanovllm.serve", model, "--port", "1", "--enforce-eager",
                           "--tensor-parallel-size", "3"], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode != 0
    assert "the engine failed to start" in done.stderr and "tensor_parallel_size" in done.stderr


def test_a_dead_engine_process_fails_requests_and_health_but_not_the_server(model, tmp_path):
    with running_server(model, tmp_path, **ENGINE) as base:
        base.model = model
        assert greedy(base, "The quick brown fox")
        os.kill(engine_process(base.pid), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while httpx.get(base + "/health").status_code == 200 and time.monotonic() < deadline:
            time.sleep(0.2)
        health = httpx.get(base + "/health")
        assert health.status_code == 503 and "exited" in health.json()["error"]["message"]
        r = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert httpx.get(base + "/version").status_code == 200


def test_ctrl_c_leaves_no_process_behind(model, tmp_path):
    with running_server(model, tmp_path, **ENGINE) as base:
        base.model = model
        assert greedy(base, [5, 6, 7])
        tree = [base.pid, *descendants(base.pid)]
        assert engine_process(base.pid) in tree
        for pid in tree:  # Ctrl-C reaches every process of the terminal's foreground group, the engine's too
            os.kill(pid, signal.SIGINT)
        deadline = time.monotonic() + 60
        while alive(tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert alive(tree) == []
