"""Tensor-parallel ranks never hang (``nanovllm/distributed/liveness.py``, ``engine/kv_cache.py``), on two CPU
ranks (gloo):

* KV sizing: ranks whose ``gc.collect()`` answers differ still run the same probes and collectives and raise the
  same error (before, only a rank that found garbage probed again, and the ranks waited in different collectives);
* a worker killed mid-step (SIGKILL) makes rank 0's ``generate`` raise ``RuntimeError`` naming rank 1, its exit code
  and what it was doing, within seconds;
* a worker that stops answering (SIGSTOP) makes it raise within ``NANOVLLM_TP_TIMEOUT_S`` and leaves no process;
* rank 0 killed with SIGKILL takes its worker with it within seconds; a script that ends without closing exits by
  itself, and one that builds a TP engine at module level (no ``__main__`` guard) is told so;
* (a process whose group failed ends within its exit bound: ``tests/test_tp_exit.py``).
Each wait runs with a bound, so that a regression fails the test instead of hanging it.  No bound is guessed: each
is ``FACTOR`` times what this module measured on this machine under its current load (``start_s``: building,
using and closing a two-rank engine; ``interpreter_s``: a fresh interpreter importing nanovllm;), so a loaded machine widens them instead of failing the tests."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest
import torch.multiprocessing as mp

from conftest import build_checkpoint, ends_within, free_port, running
from nanovllm import LLM, SamplingParams
from test_tp_sizes import spawned_workers
from test_tp_worker_failure import within_bound
from tp_exit_helpers import FACTOR, interpreter_seconds, measure_baseline

ENGINE = dict(max_num_seqs=4, kvcache_block_size=16, num_kvcache_blocks=16, max_model_len=64, enforce_eager=True,
              device="cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


@pytest.fixture(scope="module")
def start_s(model) -> float:
    """Seconds to start a two-rank engine (spawning rank 1, which joins within it), generate and close, here and
    now, with the default group timeout: the unit of this module's bounds on a rank's start and end."""
    return measure_baseline(model, ENGINE)


@pytest.fixture(scope="module")
def interpreter_s() -> float:
    """Seconds of a fresh interpreter importing nanovllm (``tp_exit_helpers.interpreter_seconds``)."""
    return interpreter_seconds()


class _MeasuringPlatform:
    """A platform that measures memory and always finds too little for one sequence."""
    measures_memory = True
    device = "cpu"

    def reset_peak_memory(self):
        pass

    def synchronize(self):
        pass

    def available_kv_bytes(self, utilization):
        return 0


def _plan_on_rank(rank: int, port: int, results) -> None:
    import gc

    import torch
    import torch.distributed as dist

    from nanovllm import distributed
    from nanovllm.engine.kv_cache import KVCacheSpec, plan_num_blocks
    distributed.init_process_group("gloo", rank, 2, init_method=f"tcp://127.0.0.1:{port}", timeout_s=20)
    gc.collect = lambda: 7 if rank == 0 else 0  # rank 0 "finds garbage", rank 1 none
    probes = []

    def probe():  # a collective of its own shape: paired with another collective it fails or waits
        t = torch.zeros(3)
        dist.broadcast(t, src=0)
        probes.append(1)
        return []

    try:
        plan_num_blocks(KVCacheSpec(2, 2, 8, 16, torch.float32), fixed=None, utilization=0.9,
                        platform=_MeasuringPlatform(), max_blocks_per_seq=4, max_model_len=64, probe=probe,
                        agree=lambda n: distributed.agree_min(n, "cpu"))
        results[rank] = ("returned", len(probes))
    except ValueError as e:
        results[rank] = (str(e), len(probes))
    except Exception as e:  # noqa: BLE001 - a timeout or mismatch: the ranks disagreed
        results[rank] = (f"{type(e).__name__}: {e}", len(probes))
    dist.destroy_process_group()


def test_ranks_whose_garbage_collection_differs_size_the_kv_cache_alike():
    with mp.get_context("spawn").Manager() as manager:  # no fork of this threaded process
        results = manager.dict()
        raised, _ = within_bound(lambda: mp.spawn(_plan_on_rank, args=(free_port(), results), nprocs=2),
                                 "the ranks wait in different collectives")
        assert raised is None, raised
        assert results[0] == results[1], dict(results)
        message, probes = results[0]
        assert "the KV cache holds 0 blocks" in message and probes == 2


def _generate_in_thread(llm) -> tuple[list, threading.Thread]:
    """Generate again and again in a thread until a call raises (handed back in the list)."""
    raised = []

    def run():
        try:
            while True:
                llm.generate([[5, 6, 7]] * 4, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                             use_tqdm=False)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            raised.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return raised, thread


@pytest.mark.parametrize("signum, expected", [(signal.SIGKILL, "rank 1 (exit code -9), while it was "),
                                              pytest.param(signal.SIGSTOP, "rank 1 has not answered for ",
                                                           marks=pytest.mark.slow)],
                         ids=["killed", "stopped"])
def test_a_worker_that_dies_or_stops_mid_step_raises_on_rank_0_naming_it(model, monkeypatch, signum, expected,
                                                                         start_s):
    """The group's timeout is ``FACTOR`` times the measured start (rank 1's start and every legitimate wait fit
    in it); a killed worker is named within one start's time (its death is seen in a beat), a stopped one within
    the timeout plus one start's time."""
    timeout = FACTOR * start_s
    monkeypatch.setenv("NANOVLLM_TP_TIMEOUT_S", f"{timeout:.1f}")  # the worker inherits it
    llm = LLM(model, tensor_parallel_size=2, max_num_batched_tokens=64, **{**ENGINE, "max_model_len": 60})
    try:
        worker = llm.engine.peers.procs[0].pid
        raised, thread = _generate_in_thread(llm)
        time.sleep(1.0)
        assert thread.is_alive(), raised
        start = time.monotonic()
        os.kill(worker, signum)
        bound = (timeout if signum == signal.SIGSTOP else 0) + start_s
        thread.join(bound)
        assert not thread.is_alive(), f"rank 0 still waits {bound:.1f} s after its peer stopped"
        assert isinstance(raised[0], RuntimeError), raised
        assert expected in str(raised[0]) and re.search(r"step|call \d+", str(raised[0])), str(raised[0])
        assert time.monotonic() - start < bound
        with pytest.raises(RuntimeError):
            llm.generate([[5, 6, 7]], use_tqdm=False)
    finally:
        llm.close()
    assert spawned_workers() == []


SCRIPT = """
import sys, time
from nanovllm import LLM, SamplingParams

def build():
    return LLM(sys.argv[1], tensor_parallel_size=2, **{engine})

if sys.argv[2] == "unguarded":
    llm = build()
if __name__ == "__main__":
    llm = build()
    print("WORKER", llm.engine.peers.procs[0].pid, flush=True)
    print(llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=3), use_tqdm=False)[0]["token_ids"])
    if sys.argv[2] == "hang":
        time.sleep(600)
"""


def _run_script(tmp_path, model, mode: str) -> subprocess.Popen:
    path = tmp_path / "script.py"
    path.write_text(textwrap.dedent(SCRIPT.format(engine=repr(ENGINE))))
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen([sys.executable, str(path), model, mode], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)


def _worker_pid(proc: subprocess.Popen) -> int:
    for line in proc.stdout:
        if line.startswith("WORKER"):
            return int(line.split()[1])
    raise AssertionError(f"the script ended (code {proc.wait()}) before it named its worker")


def test_rank_0_killed_takes_its_worker_with_it(tmp_path, model, start_s):
    """The worker sees rank 0's store gone within a beat: it ends within one measured start's time."""
    proc = _run_script(tmp_path, model, "hang")
    try:
        worker = _worker_pid(proc)
        proc.stdout.readline()  # generated: both ranks are serving
        assert running(worker)
        proc.kill()
        proc.wait(start_s)
        assert ends_within(worker, start_s), f"the worker outlived rank 0 by {start_s:.1f} s"
    finally:
        proc.kill()


def test_a_script_that_ends_without_closing_exits_by_itself(tmp_path, model, start_s, interpreter_s):
    """(``tests/test_tp_exit.py`` checks its end more closely.)  Bounded by ``FACTOR`` measured starts and
    interpreters, as the script is one interpreter and one start."""
    proc = _run_script(tmp_path, model, "end")
    worker = _worker_pid(proc)
    out, _ = proc.communicate(timeout=FACTOR * (start_s + interpreter_s))
    assert proc.returncode == 0, out
    assert not running(worker)


def test_an_engine_built_at_module_level_is_refused_with_the_reason(tmp_path, model, start_s, interpreter_s):
    proc = _run_script(tmp_path, model, "unguarded")
    out, _ = proc.communicate(timeout=FACTOR * (start_s + interpreter_s))
    assert proc.returncode != 0
    assert "rank 1" in out and 'if __name__ == "__main__":' in out and "script.py" in out, out


def _one_shot_on_rank(rank: int, port: int, made_before: bool, results) -> None:
    import torch.distributed as dist

    from nanovllm import distributed
    from nanovllm.distributed import collectives
    distributed.init_process_group("gloo", rank, 2, init_method=f"tcp://127.0.0.1:{port}", timeout_s=20)
    collectives._rendezvous_made = made_before and rank == 0  # rank 0 on its second group, rank 1 fresh
    results[rank] = collectives.one_shot_allowed("cpu")
    dist.destroy_process_group()


@pytest.mark.parametrize("made_before", [False, True], ids=["first-group", "rank-0s-second-group"])
def test_a_group_takes_the_one_shot_all_reduce_only_where_no_rank_made_a_rendezvous_before(made_before):
    with mp.get_context("spawn").Manager() as manager:  # no fork of this threaded process
        results = manager.dict()
        raised, _ = within_bound(lambda: mp.spawn(_one_shot_on_rank, args=(free_port(), made_before, results),
                                                  nprocs=2), "the ranks disagree")
        assert raised is None, raised
        assert dict(results) == {0: not made_before, 1: not made_before}


def test_a_teardown_that_hangs_is_given_up_and_named_when_joining_again(monkeypatch):
    from nanovllm import distributed
    from nanovllm.distributed import group
    from nanovllm.parallel import control
    monkeypatch.setattr(group, "_abandoned", None)
    teardown_s, bound_s = 5.0, 0.2
    start = time.monotonic()
    control._bounded(lambda: time.sleep(teardown_s), bound_s)
    assert time.monotonic() - start < teardown_s  # returned without waiting for the teardown
    assert distributed.current() == distributed.TensorParallel(0, 1)
    with pytest.raises(RuntimeError, match="took over 0.2 s; start a new process"):
        distributed.init_process_group("gloo", 0, 1, init_method=f"tcp://127.0.0.1:{free_port()}")


def test_a_closed_worker_ends_with_exit_code_0(model):
    llm = LLM(model, tensor_parallel_size=2, **ENGINE)
    procs = list(llm.engine.peers.procs)
    llm.close()
    assert [p.exitcode for p in procs] == [0]


@pytest.mark.slow
def test_precompile_at_two_ranks_builds_every_ranks_variant_and_exits(tmp_path, model):
    """``python -m nanovllm.precompile ... --tensor-parallel-size 2 --variants processed``: the variant's graphs are
    built on both ranks through the mirrored engine (rank 0 alone would wait in their collectives), and the
    command exits by itself; each rank's compile-cache entry is written."""
    env = dict(os.environ, NANOVLLM_CACHE_DIR=str(tmp_path / "cache"),
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "nanovllm.precompile", "--model", model, "--tensor-parallel-size", "2",
           "--device", "cpu", "--graph-batch-sizes", "2", "--max-num-seqs", "2", "--max-model-len", "64",
           "--kvcache-block-size", "16", "--num-kvcache-blocks", "16", "--variants", "processed"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "processed variant:" in done.stdout, done.stdout
    manifests = list((tmp_path / "cache" / "compile").glob("*/manifest.json"))
    ranks = {json.loads(m.read_text())["fields"]["rank"] for m in manifests}
    assert ranks == {0, 1}, manifests
