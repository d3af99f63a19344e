"""A bounded end for a process whose tensor-parallel group failed.

After a peer died mid-step, rank 0's device may hold work that waits for it forever: a captured symmetric-memory
all-reduce spins on a signal the dead peer never writes, and NCCL's abort does not reach it.  The interpreter's
teardown then frees device memory and the CUDA runtime destroys its context, and either can wait for that work
without end.  ``arm(seconds)`` (``liveness`` calls it when it records a failure) registers an exit hook: once the
process starts to exit, a small watcher process (a fresh interpreter, holding no device) waits ``seconds`` for it
to end and then kills it with SIGKILL, so the driver frees what it held.  A process whose teardown finishes in time
exits as it would have, with its own status; the watcher ends as soon as its parent is gone.
"""
import atexit
import os
import subprocess
import sys

_armed = False

# the watcher: it polls its parent (the exiting process) and kills it once the bound has passed
_WATCHER = """
import os, signal, sys, time
parent, deadline = int(sys.argv[1]), time.monotonic() + float(sys.argv[2])
while os.getppid() == parent and time.monotonic() < deadline:
    time.sleep(0.2)
if os.getppid() == parent:
    print(f"nanovllm: the process {parent}, whose tensor-parallel group failed, was still ending after "
          f"{sys.argv[2]} s; killing it (SIGKILL)", file=sys.stderr, flush=True)
    os.kill(parent, signal.SIGKILL)
"""


def arm(seconds: float) -> None:
    """Bound this process's exit to ``seconds`` from when it begins (once per process; later calls do nothing)."""
    global _armed
    if _armed:
        return
    _armed = True
    atexit.register(_start_watcher, seconds)  # registered late, so it runs before the hooks registered earlier


def _start_watcher(seconds: float) -> None:
    subprocess.Popen([sys.executable, "-c", _WATCHER, str(os.getpid()), f"{seconds:g}"], stdin=subprocess.DEVNULL,
                     start_new_session=True)
