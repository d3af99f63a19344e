"""Tensor parallelism under torchrun (env:// rendezvous), on the CPU over gloo: two ranks on one node, and two "nodes"
(two torchrun agents on localhost, static or c10d rendezvous), each give transformers' greedy float32 tokens (and
TP=1's); only rank 0 runs the script past ``LLM(...)``, every rank exits 0; a ``tensor_parallel_size`` other than
``WORLD_SIZE`` is refused. A rank that dies, or hangs past ``NANOVLLM_TP_TIMEOUT_S``, makes rank 0's call raise with
a note saying so (not hang), or naming it with its own error when it raised one; later calls raise at once, and
every process ends."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import build_checkpoint, free_port, hf_greedy

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
ENGINE = dict(max_num_seqs=4, kvcache_block_size=16, num_kvcache_blocks=32, max_model_len=128, enforce_eager=True,
              device="cpu")
PROMPTS = [[5, 9, 13, 2, 7], [11, 3], [4, 4, 8, 15, 16, 23, 42, 1, 2]]


def script(tmp_path, model: str, out: Path) -> Path:
    path = tmp_path / "my_script.py"
    path.write_text(textwrap.dedent(f"""
        import json, os
        from nanovllm import LLM, SamplingParams
        llm = LLM({model!r}, tensor_parallel_size=2, **{ENGINE!r})
        print("PAST_LLM rank", os.environ["RANK"], flush=True)
        outs = llm.generate({PROMPTS!r}, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
        with open({str(out)!r}, "w") as f:
            json.dump([o["token_ids"] for o in outs], f)
        llm.close()
    """))
    return path


def torchrun(*args: str, **extra_env: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", **extra_env)
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


@pytest.fixture(scope="module")
def model_and_reference(tmp_path_factory):
    from nanovllm import LLM, SamplingParams
    path = build_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")
    want = hf_greedy(path, PROMPTS, 6)
    llm = LLM(path, **ENGINE)  # TP=1 in this process
    one_rank = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert [o["token_ids"] for o in one_rank] == want
    return path, want


def test_two_ranks_on_one_node(model_and_reference, tmp_path):
    path, want = model_and_reference
    out = tmp_path / "tokens.json"
    proc = torchrun("--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                    str(script(tmp_path, path, out)))
    log, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, log
    assert json.loads(out.read_text()) == want
    assert "PAST_LLM rank 0" in log and "PAST_LLM rank 1" not in log, log


@pytest.mark.parametrize("rendezvous", ["static", "c10d"])
def test_two_nodes_of_one_rank_each(model_and_reference, tmp_path, rendezvous):
    """Static: ``--node-rank`` and ``--master-addr``, node 0 holds rank 0.  c10d (the README's example): the
    rendezvous numbers the ranks, so either agent may hold rank 0."""
    path, want = model_and_reference
    out = tmp_path / "tokens.json"
    port = str(free_port())
    my_script = str(script(tmp_path, path, out))
    if rendezvous == "static":
        args = [["--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", port] for rank in (0, 1)]
    else:
        args = [["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}"]] * 2
    nodes = [torchrun("--nnodes", "2", "--nproc-per-node", "1", *a, my_script) for a in args]
    logs = [p.communicate(timeout=240)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], logs
    assert json.loads(out.read_text()) == want
    if rendezvous == "static":
        assert "PAST_LLM rank 0" in logs[0] and "PAST_LLM" not in logs[1], logs
    assert "".join(logs).count("PAST_LLM") == 1 and "PAST_LLM rank 0" in "".join(logs), logs


@pytest.mark.parametrize("size", [1, 3])
def test_a_size_other_than_the_world_is_refused(model_and_reference, monkeypatch, size):
    from nanovllm import LLM
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(free_port())}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=f"tensor_parallel_size={size} but torchrun started WORLD_SIZE=2"):
        LLM(model_and_reference[0], tensor_parallel_size=size, **ENGINE)


def failing_script(tmp_path, model: str, rank_1_does: str) -> Path:
    """Rank 1 runs ``rank_1_does`` instead of an engine step; rank 0 reports what its calls raise."""
    path = tmp_path / "failing.py"
    path.write_text(textwrap.dedent(f"""
        import os, time
        from nanovllm import LLM, SamplingParams
        from nanovllm.engine.engine import Engine
        if os.environ["RANK"] == "1":
            Engine.step = lambda self: {rank_1_does}
        llm = LLM({model!r}, tensor_parallel_size=2, **{ENGINE!r})
        for attempt in ("FIRST", "SECOND"):
            try:
                llm.generate([[1, 2, 3]], SamplingParams(max_tokens=4), use_tqdm=False)
            except RuntimeError as e:
                print(attempt, "RAISED", e, *getattr(e, "__notes__", []), flush=True)
        llm.close()
        print("CLOSED", flush=True)
        raise SystemExit(5)
    """))
    return path


RAISES = "(_ for _ in ()).throw(ValueError('injected on rank 1'))"  # a lambda that raises


@pytest.mark.parametrize("rank_1_does, first, code", [
    ("os._exit(3)", "this call failed after the other ranks started it", 3),  # no report: a note on gloo's error
    (RAISES, "FIRST RAISED tensor-parallel worker(s) died: rank 1 (failed): ValueError: injected on rank 1", 1)],
    ids=["exits", "raises"])
def test_a_rank_that_dies_makes_rank_0_raise_on_another_node(model_and_reference, tmp_path, rank_1_does, first,
                                                              code):
    port = str(free_port())
    my_script = str(failing_script(tmp_path, model_and_reference[0], rank_1_does))
    nodes = [torchrun("--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(rank), "--master-addr",
                      "127.0.0.1", "--master-port", port, my_script) for rank in (0, 1)]
    logs = [p.communicate(timeout=120)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [1, 1], logs
    assert "FIRST RAISED" in logs[0] and first in logs[0], logs[0]
    assert "SECOND RAISED tensor-parallel rank 0 of 2 (torchrun): an earlier call failed" in logs[0], logs[0]
    assert "CLOSED" in logs[0] and "exitcode  : 5" in logs[0] and f"exitcode  : {code}" in logs[1], logs


def test_a_rank_that_hangs_fails_rank_0_after_the_timeout(model_and_reference, tmp_path):
    my_script = str(failing_script(tmp_path, model_and_reference[0], "time.sleep(120)"))
    proc = torchrun("--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
                    my_script, NANOVLLM_TP_TIMEOUT_S="10")  # 10: slack for a loaded machine at start-up
    log, _ = proc.communicate(timeout=60)  # torchrun stops the sleeping rank once rank 0 exits
    assert proc.returncode == 1, log
    assert "FIRST RAISED" in log and "Timed out" in log and "NANOVLLM_TP_TIMEOUT_S=10 s" in log, log
    assert "SECOND RAISED" in log and "CLOSED" in log and "exitcode  : 5" in log, log


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_a_bad_timeout_is_refused(monkeypatch, value):
    from nanovllm.parallel import control
    monkeypatch.setenv("NANOVLLM_TP_TIMEOUT_S", value)
    with pytest.raises(ValueError, match="NANOVLLM_TP_TIMEOUT_S"):
        control.timeout_s()
