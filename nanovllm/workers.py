"""Tensor parallelism across processes: every rank builds the same engine on its own device (the model takes its
shard from ``distributed.current()``) and runs every ``generate`` call rank 0 runs, in the same order.  The engine
is deterministic (same scheduler, same seeds, identical logits after the LM head's gather), so the ranks' steps and
hence their collectives line up without sending any step's inputs: only the calls travel, over a gloo group.

Two ways to get the ranks:

* **One node, spawned.**  ``LLM(path, tensor_parallel_size=N)`` spawns ranks 1..N-1 (``Workers``) on this node, each
  on the device its platform gives rank r (``cuda:r``, ``npu:r``; the CPU is shared), joined through a TCP store
  rank 0 hosts on localhost (``distributed/rendezvous.py``).  While the group forms, rank 0 watches its workers: one
  that dies before joining (it cannot unpickle its arguments, say an ``llm_class`` its process cannot import, or it
  crashes at import) makes ``LLM(...)`` raise ``RuntimeError`` ("tensor-parallel worker(s) died: rank 1 (exit code
  1) ...") within a fraction of a second, with the other workers stopped and this process a rank of one again; a
  worker that never starts fails the same way after ``NANOVLLM_TP_TIMEOUT_S``.  Rank 0 checks its workers before
  each call; a worker that died makes that call raise, and a collective with a dead peer fails with gloo's or
  NCCL's error.  Workers are daemon processes, so none outlives rank 0; if rank 0's engine fails to build, ``LLM``
  terminates them (they may be waiting for rank 0 in a collective of their own start).
* **Under torchrun, any number of nodes.**  When torchrun started this process (``launched_by_torchrun``: ``RANK``,
  ``WORLD_SIZE`` > 1 and ``MASTER_ADDR`` in the environment), every rank runs the user's script; ``LLM(...)`` joins
  the env:// group (``cuda:LOCAL_RANK`` per process) instead of spawning, and
  ``tensor_parallel_size`` must equal ``WORLD_SIZE``.  Rank 0 returns from ``LLM(...)`` and runs the rest of the
  script (``TorchrunPeers`` mirrors its calls); every other rank builds its engine, serves rank 0's calls, and when
  rank 0 closes the ``LLM`` (or exits) leaves the group and ends its process with exit code 0 inside ``LLM(...)``,
  so the rest of the script never runs there.

Every rank asks its platform's class (``platforms.platform_class``) for the group's backend (nccl on CUDA, hccl on
an Ascend NPU, gloo on the CPU), its device, and to bind that device before joining, so NCCL and HCCL take the same
path.

A rank that dies: torchrun stops the other ranks of its agent (one node: rank 0 gets SIGTERM).  Another node's
rank 0 learns it from its collectives: gloo fails at once (connection closed); a peer that hangs, or NCCL, fails
after the group's timeout, ``NANOVLLM_TP_TIMEOUT_S`` seconds (default 600; NCCL's watchdog then ends the process).
The error rank 0's ``generate`` raises carries a note saying so; the ranks are then out of step, so every later
call raises ``RuntimeError`` at once and ``close`` only leaves the group.  The control group never times out
waiting for rank 0's next call (a user's script may compute for hours between two ``generate`` calls); a dead rank
0 makes the others' wait fail (gloo: connection closed), and torchrun stops them.
"""
import atexit
import datetime
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import nanovllm.distributed as distributed
from nanovllm.distributed import rendezvous
from nanovllm.engine_mirror import EngineReplica
from nanovllm.platforms import platform_class

_control = None  # the gloo group the calls travel on
TIMEOUT_ENV = "NANOVLLM_TP_TIMEOUT_S"  # seconds a collective of the default group waits for a peer


def timeout_s() -> float:
    """The default group's timeout: ``$NANOVLLM_TP_TIMEOUT_S`` seconds, 600 when unset."""
    value = os.environ.get(TIMEOUT_ENV, "600")
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise ValueError(f"{TIMEOUT_ENV}={value!r}: expected a positive number of seconds")
    return seconds


def launched_by_torchrun() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) if torchrun started this process as one of several ranks, else None."""
    env = os.environ
    if "RANK" in env and "MASTER_ADDR" in env and int(env.get("WORLD_SIZE", "1")) > 1:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"]))
    return None


def rank_device(device: str, rank: int) -> str:
    """The device of this process for the engine option ``device``: the platform's device of ``LOCAL_RANK`` under
    torchrun, of ``rank`` for a spawned rank (``cuda:r``, ``npu:r``; the option itself for the CPU)."""
    launched = launched_by_torchrun()
    return platform_class(device).rank_device(device, launched[2] if launched else rank)


def _join(device: str, rank: int, size: int, store: dist.Store | None = None) -> None:
    """Bind this rank's device and join the default group over the platform's backend (through ``store``, rank
    0's, announcing this rank there first; None: env://), then the control group."""
    global _control
    platform = platform_class(device)
    platform.bind_rank(rank_device(device, rank))
    if store is not None and rank:
        rendezvous.announce(store, rank)
    distributed.init_process_group(platform.distributed_backend, rank, size, None, timeout_s(), store=store)
    _control = dist.new_group(backend="gloo", timeout=datetime.timedelta(days=365))


def broadcast_call(call: tuple | None = None):
    """Rank 0: send ``call`` to every rank; another rank: receive the next one."""
    box = [call]
    dist.broadcast_object_list(box, src=0, group=_control)
    return box[0]


def serve_calls(llm) -> None:
    """A worker's loop: run each call rank 0 sends, until it sends ``("exit",)``.  A call named ``"engine"`` is
    one of ``MirroredEngine``'s (``engine_mirror.py``)."""
    replica = EngineReplica(llm.engine)
    while True:
        call = broadcast_call()
        if call[0] == "exit":
            return
        name, args, kwargs = call
        try:
            (replica if name == "engine" else getattr(llm, name))(*args, **kwargs)
        except (ValueError, TypeError):  # bad input: rank 0 raised the same error before any collective
            pass


class _Peers:
    """What rank 0's two sides share: once a call failed after the ranks started it, they are out of step."""
    broken: str | None = None
    label = "tensor-parallel rank 0"

    def check(self) -> None:
        if self.broken:
            raise RuntimeError(f"{self.label}: an earlier call failed ({self.broken}); the ranks are out of step "
                               f"or gone, so this LLM cannot run calls any more")

    def failed(self, error: BaseException) -> None:
        """Rank 0's call raised ``error`` after the other ranks started it: refuse later calls, explain it."""
        self.broken = f"{type(error).__name__}: {error}"[:300]
        error.add_note(f"{self.label}: this call failed after the other ranks started it; if a peer rank died, "
                       f"its log (torchrun reports the first failure) says why; a peer that hangs fails a collective "
                       f"after {TIMEOUT_ENV}={timeout_s():g} s.  Later calls of this LLM raise at once.")


class Workers(_Peers):
    """Rank 0's side of a tensor-parallel engine (see the module docstring)."""

    def __init__(self, llm_class, model, options: dict, size: int):
        """Start ranks 1..``size``-1, each building ``llm_class(model, **options)``, and join them as rank 0."""
        device = options.get("device", "auto")
        platform = platform_class(device)
        count = platform.visible_device_count()
        if count is not None and size > count:
            raise ValueError(f"tensor_parallel_size={size} is more than the {count} visible {platform.name} devices "
                             f"(${platform.visible_devices_env} limits them)")
        self.procs, self.closed, timeout = [], False, timeout_s()
        store = rendezvous.host(size, timeout)
        ctx = mp.get_context("spawn")
        try:
            for rank in range(1, size):
                p = ctx.Process(target=_worker_main, args=(rank, size, store.port, llm_class, model, options),
                                daemon=True)
                p.start()
                self.procs.append(p)
            rendezvous.wait_for_ranks(store, list(range(1, size)), self.dead, timeout)
            _join(device, 0, size, store)
        except BaseException:  # a worker died (or never started): stop the others, stay a rank of one
            self.close(serving=False)
            raise
        atexit.register(self.close)

    def dead(self) -> list[tuple[int, int | None]]:
        """(rank, exit code) of each worker whose process ended."""
        return [(rank, p.exitcode) for rank, p in enumerate(self.procs, 1) if not p.is_alive()]

    def call(self, name: str, *args, **kwargs) -> None:
        dead = self.dead()
        if dead:
            raise RuntimeError(rendezvous.describe_dead(dead))
        self.check()
        broadcast_call((name, args, kwargs))

    def close(self, serving: bool = True) -> None:
        """Send the workers ``("exit",)``, leave the group with them and join them (a worker still alive after
        30 s is killed).  ``serving=False``: rank 0 failed before the workers began serving its calls (a worker
        died at start-up, or rank 0's engine failed to build; each may wait for rank 0 in a collective of its
        engine's start, and would not receive the message), so they are terminated instead.  A worker already
        gone makes neither raise."""
        if self.closed:
            return
        self.closed = True
        alive = serving and all(p.is_alive() for p in self.procs) and not self.broken
        if alive:
            try:
                broadcast_call(("exit",))
            except RuntimeError:  # a worker died since the check (gloo: connection closed): stop the rest below
                alive = False
        try:
            if alive:
                leave_group()  # the workers leave too, on "exit"
        finally:
            for p in self.procs:
                if not serving:
                    p.terminate()
                p.join(timeout=30)
                if p.is_alive():
                    p.kill()
            if not alive:
                leave_group()


class TorchrunPeers(_Peers):
    """Rank 0's side of a group that torchrun started (see the module docstring): ``call`` and ``close`` as
    ``Workers``'s; the other ranks' processes belong to torchrun."""

    def __init__(self, options: dict, size: int):
        rank, world, _ = launched_by_torchrun()
        if size != world:
            raise ValueError(f"tensor_parallel_size={size} but torchrun started WORLD_SIZE={world} processes; "
                             f"they must be equal")
        _join(options.get("device", "auto"), rank, world)
        self.rank, self.closed = rank, False
        self.label = f"tensor-parallel rank 0 of {world} (torchrun)"
        if rank == 0:
            atexit.register(self.close)

    def call(self, name: str, *args, **kwargs) -> None:
        self.check()
        try:
            broadcast_call((name, args, kwargs))
        except Exception as e:  # a peer that died closed its connection
            self.broken = f"{type(e).__name__}: {e}"[:300]
            raise RuntimeError(f"{self.label}: sending {name!r} to the other ranks failed: a peer rank is gone "
                               f"(its log, or torchrun's report of the first failure, says why)") from e

    def close(self, serving: bool = True) -> None:
        """As ``Workers.close``; with ``serving=False`` rank 0 sends no exit message and only leaves the group,
        so the other ranks' collectives fail and torchrun ends them."""
        if self.closed:
            return
        self.closed = True
        if not serving:
            self.broken = "rank 0 failed to build its engine"
        if self.rank == 0 and not self.broken:
            try:
                broadcast_call(("exit",))
            except RuntimeError as e:  # a peer is already gone: nothing to tell it; still leave the group
                self.broken = f"{type(e).__name__}: {e}"[:300]
        try:
            leave_group()
        except Exception:
            if not self.broken:
                raise


def serve_then_exit(llm) -> None:
    """A torchrun rank other than 0, its engine built: serve rank 0's calls, leave the group, end the process."""
    serve_calls(llm)
    leave_group()
    raise SystemExit(0)


def leave_group() -> None:
    """Forget the control group and leave the default one; this process is one rank of one again.

    NCCL groups are aborted, not destroyed: ``destroy_process_group`` waits for every rank's communicator
    teardown, and two H200 ranks were seen stuck in it together at exit.  Leaving happens after the last step's
    results were read, so nothing is in flight (the device is synchronized first) and an abort, which returns
    without waiting for the peers, loses nothing."""
    global _control
    _control = None
    distributed.release_one_shot_all_reduce()
    if dist.is_initialized():
        if dist.get_backend() == "nccl":
            torch.cuda.synchronize()
            dist.distributed_c10d._abort_process_group()
        else:
            dist.destroy_process_group()
    distributed.set_current(distributed.TensorParallel())


def _worker_main(rank: int, size: int, port: int, llm_class, model, options: dict) -> None:
    _join(options.get("device", "auto"), rank, size, rendezvous.connect(port, size, timeout_s()))
    serve_calls(llm_class(model, **options))
    leave_group()

