"""A program that builds a tensor-parallel engine and simply ends exits with status 0, within a bound, leaving no
process (design rule 11), on two CPU ranks (gloo) in eager mode (``tests/tp_exit_helpers.py``):

* the script ends without ``llm.close()``: status 0, no worker left running, no "terminate called", and rank 0
  tears down as ``close()`` does, its engine closed before the group is left (the other order left NCCL's abort
  waiting 30 s on the engine's CUDA graphs and the process aborted, on two GPUs: the atexit hook of ``LLM``);
* it ends within ``FACTOR`` times the end of the same script that calls ``close()``, plus one interpreter's start
  and exit, both measured in the test;
* a process whose group failed ends within its exit bound (``distributed/exit_bound.py``), a bound measured as
  ``FACTOR`` times the same script's whole run unarmed, else with its own status;
* closing the peers alone (their exit hook, ``control.SpawnedPeers.close``) closes the engine attached to them
  first too, and a peer that never takes ``CLOSE`` is ended by signal instead of waited on without end.
The two-GPU twin, in graph and eager mode (graph mode is where the abort was seen), is
``tests/gpu/test_tensor_parallel_exit.py``."""
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import build_checkpoint
from nanovllm.parallel import control
from test_tp_close import Proc
from tp_exit_helpers import FACTOR, ROOT, check_exits_cleanly

ENGINE = dict(max_num_seqs=4, kvcache_block_size=16, num_kvcache_blocks=16, max_model_len=64, device="cpu")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


def test_an_eager_script_that_ends_without_closing_exits_cleanly(tmp_path, model):
    check_exits_cleanly(tmp_path, model, dict(ENGINE, enforce_eager=True))


EXIT_SCRIPT = """
import atexit, sys, time
from nanovllm.distributed import exit_bound
atexit.register(time.sleep, 600)  # a teardown that never ends (a device waiting for a dead peer)
if sys.argv[1] != "hangs":
    atexit.unregister(time.sleep)
if sys.argv[1] != "unarmed":
    exit_bound.arm(float(sys.argv[2]))
sys.exit(3)
"""


def _exit_script(teardown: str, bound_s: float, timeout: float | None = None):
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", EXIT_SCRIPT, teardown, f"{bound_s:.3f}"], capture_output=True,
                          text=True, timeout=timeout, env=env)


@pytest.mark.parametrize("teardown", [pytest.param("hangs", marks=pytest.mark.slow), "ends"])
def test_a_failed_groups_process_ends_within_its_exit_bound_else_with_its_own_status(teardown):
    """The bound is ``FACTOR`` times the same script's whole run unarmed (its start, import and teardown),
    measured first: a teardown that ends is never cut short by it, one that hangs is killed once it passed (the
    run then lasts at most the bound and ``FACTOR`` more such runs: its own start, the watcher's, the kill)."""
    start = time.monotonic()
    assert _exit_script("unarmed", 0.0).returncode == 3
    run_s = time.monotonic() - start
    bound_s = FACTOR * run_s
    limit_s = bound_s + 2 * FACTOR * run_s  # past the asserted bound: the assertion reports, not a timeout
    start = time.monotonic()
    done = _exit_script(teardown, bound_s, timeout=limit_s)
    if teardown == "hangs":
        assert done.returncode == -signal.SIGKILL and "killing it (SIGKILL)" in done.stderr, done
        assert time.monotonic() - start < bound_s + FACTOR * run_s
    else:
        assert done.returncode == 3, done


class StandInEngine:
    def __init__(self, log):
        self.log = log

    def close(self):
        self.log.append("engine")


def test_closing_the_peers_alone_closes_their_engine_before_leaving_the_group(monkeypatch):
    log = []
    monkeypatch.setattr(control, "send", lambda op, arg=0, payload=b"": log.append(op))
    monkeypatch.setattr(control, "flush", lambda timeout=None: log.append(("flush", timeout)))
    monkeypatch.setattr(control, "leave_group", lambda: log.append("group"))
    peers, engine = control.SpawnedPeers([Proc()]), StandInEngine(log)
    peers.attach(engine)
    peers.close()
    peers.close()  # idempotent
    assert log == ["engine", control.CLOSE, ("flush", control.timeout_s()), "group"]


def test_a_peer_that_never_takes_close_is_ended_by_signal_not_waited_on(monkeypatch):
    """``flush`` with a deadline raises once it passed (a work that never completes: a peer alive but stuck), and
    ``close`` then ends the peer by signal."""
    class StuckWork:
        def is_completed(self):
            return False

    monkeypatch.setattr(control, "_in_flight", control.collections.deque([([StuckWork()], [])]))
    with pytest.raises(RuntimeError, match="did not take rank 0's call in time"):
        control.flush(0.0)
    log, proc = [], Proc()

    def send(op, arg=0, payload=b""):
        log.append(op)

    def flush(timeout=None):
        raise RuntimeError("a tensor-parallel peer did not take rank 0's call in time")

    monkeypatch.setattr(control, "send", send)
    monkeypatch.setattr(control, "flush", flush)
    monkeypatch.setattr(control, "leave_group", lambda: log.append("group"))
    control.SpawnedPeers([proc]).close()
    assert log == [control.CLOSE, "group"] and proc.did == ["terminate", "join"]
