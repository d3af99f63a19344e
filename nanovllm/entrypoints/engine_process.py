"""The server's engine in a process of its own: ``start`` spawns it, builds ``LLM(model, **options)`` there and
waits until it is ready; ``main`` is that process.  The front (HTTP, JSON, detokenization, stop strings) and the
engine's host work (scheduling, launching graphs) then run on two cores instead of taking turns on one GIL.

Contract:
* ``start`` returns ``(process, to_core, from_core, info)`` once the engine is built; ``info`` has ``model``,
  ``hf_config``, ``vocab_size`` and ``max_model_len`` (what ``prompts.Prompts`` needs) and ``pooler`` (its
  ``PoolerConfig``).  If the engine fails to build, or the process dies first, it raises ``RuntimeError`` with
  the cause; the process is gone by then.
* The process ignores SIGINT: Ctrl-C reaches the whole process group, and the front stops the engine in order
  (``("stop",)``, which also closes the LLM's tensor-parallel workers).  When the front's process dies, the engine's
  pipe closes and the process exits at its next step.  It is not a daemon, so that it may start tensor-parallel
  workers of its own.
"""
import multiprocessing
import pickle
import signal

from nanovllm.entrypoints.engine_core import EngineCore, dumps


def start(model: str, options: dict):
    ctx = multiprocessing.get_context("spawn")
    core_inbox, to_core = ctx.Pipe(duplex=False)
    from_core, core_outbox = ctx.Pipe(duplex=False)
    process = ctx.Process(target=main, args=(model, options, core_inbox, core_outbox), name="nanovllm-engine")
    process.start()
    core_inbox.close()  # the child's ends: closed here, so that its exit reads as EOF
    core_outbox.close()
    try:
        while not from_core.poll(1.0):
            if not process.is_alive():
                raise RuntimeError(f"the engine process exited with code {process.exitcode} before it was ready")
        message = pickle.loads(from_core.recv_bytes())
        if message[0] != "ready":
            raise RuntimeError(f"the engine failed to start: {message[1]}")
    except BaseException:  # includes Ctrl-C while the engine builds
        stop(process, to_core)
        raise
    return process, to_core, from_core, message[1]


def stop(process, to_core, timeout: float = 60.0) -> None:
    """Ask the engine process to stop, and end it if it has not within ``timeout`` seconds."""
    try:
        to_core.send_bytes(dumps(("stop",)))
    except OSError:
        pass
    process.join(timeout)
    if process.is_alive():
        process.terminate()
        process.join(10)
    if process.is_alive():
        process.kill()
        process.join()


def main(model: str, options: dict, inbox, outbox) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    from nanovllm.llm import LLM
    try:
        llm = LLM(model, **options)
    except BaseException as e:  # noqa: BLE001 - the front reports it and exits
        outbox.send_bytes(dumps(("failed", f"{type(e).__name__}: {e}")))
        raise SystemExit(1) from None
    config = llm.config
    outbox.send_bytes(dumps(("ready", {"model": config.model, "hf_config": config.hf_config,
                                       "vocab_size": llm.prompts.vocab_size, "max_model_len": config.max_model_len,
                                       "pooler": config.pooler})))
    try:
        EngineCore(llm.engine).serve(inbox, outbox)
    finally:
        llm.close()
