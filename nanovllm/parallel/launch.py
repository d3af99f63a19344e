"""Starting the ranks of a tensor-parallel engine: ``start(model, options, engine_class)``, called by ``LLM``
before it builds rank 0's engine, returns rank 0's peers (``control.py``) or None at one rank.

* ``tensor_parallel_size=N`` > 1 on one node: spawns ranks 1..N-1, each on the device its platform gives rank r
  (``cuda:r``, ``npu:r``; the CPU is shared), meeting through rank 0's store (``distributed/rendezvous.py``).  A
  rank that dies before joining makes ``start`` raise ``RuntimeError`` naming it and its exit code, leaving no
  process and this process a rank of one.
* Under torchrun (``RANK``, ``WORLD_SIZE`` > 1, ``MASTER_ADDR`` set): joins torchrun's env:// group; N must equal
  ``WORLD_SIZE`` (``ValueError``).  Rank 0 returns; any other rank builds its engine, replays rank 0's calls
  (``mirror.serve``) until rank 0 closes, and ends its process (exit code 0) inside ``start``.
* A rank other than 0 builds ``engine_class(config)`` (importable in a spawned process) with its rank's options.
  Any exception there ends it: it logs the traceback, reports "TypeName: message" in the store and exits with
  code 1, so that rank 0's next call fails, raising ``RuntimeError`` with that message (``control.py``).
* Options are validated (``EngineConfig``) before any process starts.  A script that builds its ``LLM`` at module
  level builds it again in each spawned rank (spawn re-imports the main module): that raises, saying so, on rank 0.
"""
import atexit
import functools
import os
import sys

import torch.multiprocessing as mp
from multiprocessing import util as mp_util

import nanovllm.distributed as distributed
from nanovllm.config import EngineConfig
from nanovllm.distributed import liveness, rendezvous
from nanovllm.logger import logger
from nanovllm.parallel import control, mirror
from nanovllm.platforms import platform_class

SPAWNED_NAME = "nanovllm-tp-spawned-rank-"  # + "rank:port:size": a spawned rank's process name until _serve runs


def launched_by_torchrun() -> tuple[int, int, int] | None:
    """(rank, world size, local rank) if torchrun started this process as one of several ranks, else None."""
    env = os.environ
    if "RANK" in env and "MASTER_ADDR" in env and int(env.get("WORLD_SIZE", "1")) > 1:
        return int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"]))
    return None


def rank_device(device: str, rank: int) -> str:
    """This process's device for the option ``device``: the platform's device of ``LOCAL_RANK`` under torchrun,
    of ``rank`` for a spawned rank (``cuda:r``, ``npu:r``; the option itself for the CPU)."""
    launched = launched_by_torchrun()
    return platform_class(device).rank_device(device, launched[2] if launched else rank)


def rank_options(options: dict) -> dict:
    """``options`` with this process's device in the current group (unchanged at one rank)."""
    tp = distributed.current()
    if tp.size == 1:
        return options
    return dict(options, device=rank_device(options.get("device", "auto"), tp.rank))


def join(device: str, rank: int, size: int, store=None, peers=None) -> None:
    """Bind this rank's device, join the default group over the platform's backend (through rank 0's ``store``,
    announcing this rank there first; None: env://), open the control channel and start this rank's liveness
    watch (``distributed/liveness.py``; on rank 0 over ``peers``, the ranks it spawned)."""
    platform = platform_class(device)
    platform.bind_rank(rank_device(device, rank))
    if store is not None and rank:
        rendezvous.announce(store, rank)
    timeout = control.timeout_s()
    distributed.init_process_group(platform.distributed_backend, rank, size, None, timeout, store=store)
    control.open_channel()
    port = store.port if store is not None else None
    liveness.start(rank, size, functools.partial(rendezvous.connect_watch, port, size, timeout), timeout,
                   dead=peers.dead if peers is not None else None, kill=peers.kill if peers is not None else None)


def start(model, options: dict, engine_class):
    """Rank 0's peers, or None at one rank (see the module docstring)."""
    size = options.get("tensor_parallel_size", 1)
    if mp.current_process().name.startswith(SPAWNED_NAME):
        _refuse_in_spawned_rank(size)
    if distributed.current().size > 1:  # already in a group: this process is one rank of it
        return None
    launched = launched_by_torchrun()
    if launched:
        EngineConfig(model=model, **options)
        rank, world, _ = launched
        if size != world:
            raise ValueError(f"tensor_parallel_size={size} but torchrun started WORLD_SIZE={world} processes; "
                             f"they must be equal")
        join(options.get("device", "auto"), rank, world)
        if rank == 0:
            peers = control.TorchrunPeers(world)
            atexit.register(peers.close)
            return peers
        _serve(engine_class, model, options, rank, world)  # ends the process
    if isinstance(size, int) and size > 1:
        EngineConfig(model=model, **options)  # bad options fail here, before any process starts
        return _spawn(engine_class, model, options, size)
    return None


def _refuse_in_spawned_rank(size) -> None:
    """``LLM(...)`` called in a rank this module spawned, before its ``_serve`` ran: the spawn start method
    re-imports the script's main module in every rank, and this script builds its engine at module level.  Report
    that to rank 0 (so its error says so) and raise."""
    rank, port, world = (int(x) for x in mp.current_process().name[len(SPAWNED_NAME):].split(":"))
    main = getattr(sys.modules.get("__main__"), "__file__", None) or "the main module"
    error = RuntimeError(
        f"LLM(..., tensor_parallel_size={size}) was called while tensor-parallel rank {rank} imported {main}: "
        f"ranks are started with the 'spawn' method, which imports the script's main module again in each of them, "
        f"so a script must build its LLM under `if __name__ == \"__main__\":` (see the README, Tensor "
        f"parallelism)")
    try:
        rendezvous.report_error(rendezvous.connect(port, world, 10.0), rank, error)
    finally:
        raise error


def _spawn(engine_class, model, options: dict, size: int) -> control.SpawnedPeers:
    platform = platform_class(options.get("device", "auto"))
    count = platform.visible_device_count()
    if count is not None and size > count:
        raise ValueError(f"tensor_parallel_size={size} is more than the {count} visible {platform.name} devices "
                         f"(${platform.visible_devices_env} limits them)")
    timeout = control.timeout_s()
    store = rendezvous.host(size, timeout)
    ctx = mp.get_context("spawn")
    peers = control.SpawnedPeers([], store)
    try:
        for rank in range(1, size):
            p = ctx.Process(target=_serve, args=(engine_class, model, options, rank, size, store.port),
                            daemon=True, name=f"{SPAWNED_NAME}{rank}:{store.port}:{size}")
            p.start()
            peers.procs.append(p)
        rendezvous.wait_for_ranks(store, list(range(1, size)), peers.dead, timeout)
        try:
            join(options.get("device", "auto"), 0, size, store, peers)
        except Exception as e:  # a rank that died while joining: its own error, not the transport's
            peers.build_failed(e)
            raise
    except BaseException:  # a rank died (or never started): stop the others, stay a rank of one
        peers.close(serving=False)
        raise
    atexit.register(peers.close)
    return peers


def _serve(engine_class, model, options: dict, rank: int, size: int, port: int | None = None) -> None:
    """A rank other than 0: join through rank 0's store on ``port`` (a spawned rank; torchrun's joined already),
    build the engine, replay rank 0's calls until ``CLOSE`` (the engine is closed then, its device synchronised) and
    end the process with code 0 without tearing the group down: NCCL's abort or destroy can wait on a peer, and the
    process's end frees all it held.  On any exception, log it, report it to rank 0 in the store and exit with
    code 1."""
    store = None
    mp.current_process().name = f"nanovllm-tp-rank-{rank}"  # serving now: an LLM(...) here is no re-import
    try:
        if port is not None:
            store = rendezvous.connect(port, size, control.timeout_s())
            join(options.get("device", "auto"), rank, size, store)
        mirror.serve(engine_class(EngineConfig(model=model, **rank_options(options))))
    except BaseException as e:  # noqa: BLE001 - rank 0 must see it, not wait for this rank
        logger.exception("tensor-parallel rank %d failed; ending its process with exit code 1", rank)
        rendezvous.report_error(store if store is not None else rendezvous.group_store(), rank, e)
        sys.stderr.flush()
        os._exit(1)
    mp_util._run_finalizers(0)  # multiprocessing's own end-of-process finalizers (semaphores), joining nothing
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
