"""A program that builds a tensor-parallel ``LLM`` (two ranks), generates and ends, with ``llm.close()`` or
without (it falls off its end), run as a process of its own, and what the exit tests need to judge it:
``tests/test_tp_exit.py`` (CPU, gloo) and ``tests/gpu/test_tensor_parallel_exit.py`` (two CUDA devices, NCCL).

Contract of ``run_script``: it starts ``SCRIPT`` from the repository root with this worktree first on
``PYTHONPATH`` and a marker in its environment (every process it starts inherits it), waits at most ``limit_s``
for it to end (past that it reports ``code=None``), gives what it started (multiprocessing's resource tracker
ends once its pipe closes) ``grace_s`` more to end, kills every process still carrying the marker, and returns
an ``Ending``: the exit status, the seconds from the script's last statement (``ENDING``) to its exit, the pids
of the ranks it spawned, the order in which rank 0 closed its engine and left the group, the processes with its
marker still running after the grace (with their command lines), and its stdout and stderr.  No bound here is
a constant: the tests derive theirs from ``measure_baseline`` and ``interpreter_seconds``, measured in the same
test.
"""
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from conftest import processes_with, running

ROOT = Path(__file__).resolve().parents[1]
FACTOR = 3  # how much slower than the measured baseline a step may be on a machine whose load changes meanwhile

SCRIPT = """
import json, sys, time
if __name__ == "__main__":
    from nanovllm import LLM, SamplingParams
    from nanovllm.engine.engine import Engine
    from nanovllm.parallel import control

    def noted(what, call):  # rank 0's teardown steps, in the order they run
        def run(*args, **kwargs):
            print("TEARDOWN", what, flush=True)
            return call(*args, **kwargs)
        return run

    Engine.close = noted("engine", Engine.close)
    control.leave_group = noted("group", control.leave_group)
    model, ending, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    llm = LLM(model, tensor_parallel_size=2, **options)
    print("WORKERS", *[p.pid for p in llm.engine.peers.procs], flush=True)
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    print("TOKENS", *out[0]["token_ids"], flush=True)
    print("ENDING", time.time(), flush=True)
    if ending == "close":
        llm.close()
"""


@dataclass
class Ending:
    code: int | None  # None: still running after the limit (then killed)
    exit_s: float | None  # seconds from ENDING to the process's end
    workers: list[int]
    teardown: list[str]  # "engine" / "group", as rank 0 ran them
    left: list[str]  # "pid: command line" of each process of the run still running ``grace_s`` after it ended
    out: str
    err: str


def interpreter_seconds() -> float:
    """Wall seconds of a fresh interpreter that imports nanovllm (and torch) and exits: the test's unit of noise."""
    start = time.monotonic()
    subprocess.run([sys.executable, "-c", "import nanovllm"], check=True, env=script_env(), cwd=ROOT)
    return time.monotonic() - start


def script_env(**extra) -> dict:
    """This environment with the worktree's nanovllm first on ``PYTHONPATH`` (and ``extra``)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, **extra)


def run_script(tmp_path: Path, model: str, ending: str, options: dict, limit_s: float, grace_s: float) -> Ending:
    """Run ``SCRIPT`` (``ending``: "close" or "end") on ``model`` with the LLM ``options``; see the module."""
    name, marker = "NANOVLLM_TEST_TP_EXIT", uuid.uuid4().hex
    path = tmp_path / f"script_{ending}.py"
    path.write_text(SCRIPT)
    out_path, err_path = tmp_path / f"{ending}.out", tmp_path / f"{ending}.err"
    with open(out_path, "w") as out, open(err_path, "w") as err:  # files: a process left behind holds no pipe
        proc = subprocess.Popen([sys.executable, str(path), model, ending, json.dumps(options)], cwd=ROOT,
                                env=script_env(**{name: marker}), stdout=out, stderr=err)
        try:
            code = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            code = None
        ended = time.time()
        deadline = time.monotonic() + grace_s
        while (left := processes_with(f"{name}={marker}")) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = [f"{pid}: {_command(pid)}" for pid in left]
        for pid in processes_with(f"{name}={marker}"):  # none may outlive the test
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        proc.wait()
    text = out_path.read_text()
    fields = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.split()}
    ending_at = fields.get("ENDING")
    return Ending(code, ended - float(ending_at[0]) if ending_at and code is not None else None,
                  [int(p) for p in fields.get("WORKERS", [])],
                  [line.split()[1] for line in text.splitlines() if line.startswith("TEARDOWN ")],
                  left, text, err_path.read_text())


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")[:200]
    except OSError:
        return "(gone)"


def measure_baseline(model: str, options: dict) -> float:
    """Wall seconds of building, generating with and closing the same two-rank LLM in this process: the bound of a
    whole script run is ``FACTOR`` times this plus ``FACTOR`` interpreters (``interpreter_seconds``)."""
    from nanovllm import LLM, SamplingParams
    start = time.monotonic()
    with LLM(model, tensor_parallel_size=2, **options) as llm:
        llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    return time.monotonic() - start


def check_exits_cleanly(tmp_path: Path, model: str, options: dict) -> tuple[Ending, Ending]:
    """Run the script with ``close()`` (the baseline), then without; assert of the second: status 0, the same
    orderly teardown as ``close()`` (rank 0's engine closed before the group is left, the group left once), no
    worker or other process of it left running, "terminate called" nowhere in its stderr, and its end within
    ``FACTOR`` times the baseline's end plus one interpreter's start and exit; what the script started may take
    one interpreter's start and exit more to end.  Returns (baseline, run)."""
    unit = interpreter_seconds()
    limit = FACTOR * (measure_baseline(model, options) + unit)
    closed = run_script(tmp_path, model, "close", options, limit, unit)
    assert closed.code == 0, (closed.code, closed.err[-3000:])
    ended = run_script(tmp_path, model, "end", options, limit, unit)
    assert ended.code == 0, f"status {ended.code} (None: still running after {limit:.0f} s)\n{ended.err[-3000:]}"
    assert "terminate called" not in ended.err, ended.err[-3000:]
    assert ended.workers and not any(running(w) for w in ended.workers), ended.workers
    assert closed.left == [] and ended.left == [], (closed.left, ended.left)
    assert closed.teardown[0] == "engine" and closed.teardown.count("group") == 1, closed.teardown
    assert ended.teardown[0] == "engine" and ended.teardown.count("group") == 1, ended.teardown
    bound = FACTOR * closed.exit_s + unit
    assert ended.exit_s <= bound, (f"ending without close() took {ended.exit_s:.1f} s, with close() "
                                   f"{closed.exit_s:.1f} s (bound {bound:.1f} s)")
    return closed, ended
