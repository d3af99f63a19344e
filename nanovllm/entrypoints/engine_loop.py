"""``EngineLoop``: the server's front side of its engine, for the asyncio handlers.  The engine itself is an
``EngineCore`` (``engine_core.py``) behind two pipes, in a process of its own (``in_process``,
``engine_process.py``).  Contract:
* ``submit`` and ``abort`` are non-blocking and called on the event loop's thread.  A writer thread sends the
  commands; a reader thread takes each engine step's deltas and hands them, with one ``call_soon_threadsafe`` per
  step, to each request's ``asyncio.Queue`` as ``(choice index, SequenceOutput)``.  A request of ``n`` choices is ``n``
  sequences.  New requests join the running batch between steps.
* ``abort`` ends the request's choices at once (the core frees their KV blocks); nothing more is delivered for them.
* ``submit`` refuses (``Overloaded``) when the sequences waiting for a batch slot (submitted and not yet in the
  engine, plus those in its waiting queue) would pass ``max_waiting_seqs``, so the queue is bounded.
* If the engine fails or its process dies, every live request gets ``(None, error)``, ``error`` is set and
  later submits raise ``EngineDead``.
* ``stats``: sequences running and waiting, and the share of KV blocks in use, as of the last step.
* ``lora``: awaits ``Engine.add_lora`` or ``remove_lora`` run in the engine between steps (the server's adapters).
"""
import asyncio
import itertools
import pickle
import threading
import time
from collections import deque

from nanovllm.entrypoints import engine_process
from nanovllm.entrypoints.engine_core import dumps
from nanovllm.logger import logger

__all__ = ["EngineDead", "EngineLoop", "Overloaded", "RequestHandle"]


class Overloaded(Exception):
    pass


class EngineDead(Exception):
    pass


class RequestHandle:
    """One API request on the asyncio side: its queue of ``(choice index, SequenceOutput)`` events."""

    def __init__(self, prompt_ids: list[int], params: list, images=None, lora=None):
        self.prompt_ids, self.params, self.images, self.lora = prompt_ids, params, images, lora
        self.queue: asyncio.Queue = asyncio.Queue()
        self.arrival = time.perf_counter()
        self.rid: int | None = None
        self.open = set(range(len(params)))  # choices the engine may still send for


class EngineLoop:
    def __init__(self, to_core, from_core, max_waiting_seqs: int, process=None):
        """The front of the ``EngineCore`` at the other ends of the pipes ``to_core`` and ``from_core``, run by
        ``process`` (``in_process`` builds both); stopping the core is then the process's business."""
        self.max_waiting_seqs = max_waiting_seqs
        self._to_core, self._from_core = to_core, from_core
        self._process = process
        self._outbox: deque = deque()  # commands for the writer thread
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._rids = itertools.count()
        self._handles: dict[int, RequestHandle] = {}  # event loop's thread only
        self._lora_calls: dict[int, asyncio.Future] = {}  # ``lora`` calls awaiting the engine's reply, by token
        self._submitted = self._added = 0  # sequences submitted here, and handed to the engine (as last reported)
        self._snapshot = {"running": 0, "waiting": 0, "kv_cache_usage": 0.0}
        self._stopping = False
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._reader = threading.Thread(target=self._read, name="nanovllm-engine-reader", daemon=True)
        self._writer = threading.Thread(target=self._write, name="nanovllm-engine-writer", daemon=True)

    @classmethod
    def in_process(cls, model: str, options: dict, max_waiting_seqs: int) -> tuple["EngineLoop", dict]:
        """Build the engine in a process of its own (blocks until it is ready); returns the loop and the
        engine's ``info`` (``engine_process.start``)."""
        process, to_core, from_core, info = engine_process.start(model, options)
        return cls(to_core, from_core, max_waiting_seqs, process=process), info

    # ---- event loop's thread ------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._reader.start()
        self._writer.start()

    def shutdown(self) -> None:
        self._stopping = True
        self._send(("stop",))
        if self._process is not None:
            if self._writer.ident is not None:  # (not started: the server failed before serving)
                self._writer.join(timeout=10)
            engine_process.stop(self._process, self._to_core)

    def submit(self, prompt_ids: list[int], params: list, images=None, lora=None) -> RequestHandle:
        """Queue a request of ``len(params)`` sequences on one prompt (with its ``ImageInputs``, if it has images,
        and its ``LoRARequest``, if it names an adapter); raises ``Overloaded``/``EngineDead``."""
        with self._lock:
            if self.error is not None:
                raise EngineDead(f"the engine failed: {self.error!r}")
            waiting = self._submitted - self._added + self._snapshot["waiting"]
            if waiting + len(params) > self.max_waiting_seqs:
                raise Overloaded(f"{waiting} sequences are waiting for a batch slot; this request's {len(params)} "
                                 f"would pass --max-waiting-seqs={self.max_waiting_seqs}")
            self._submitted += len(params)
        handle = RequestHandle(prompt_ids, params, images, lora)
        handle.rid = next(self._rids)
        self._handles[handle.rid] = handle
        self._send(("add", handle.rid, prompt_ids, params, images, lora))
        return handle

    async def lora(self, op: str, arg) -> str | None:
        """Run ``Engine.add_lora(arg)`` (``op`` "load") or ``Engine.remove_lora(arg)`` ("remove") in the engine
        between steps; returns the error's message (a bad adapter, one in use) or None.  Raises ``EngineDead``."""
        if self.error is not None:
            raise EngineDead(f"the engine failed: {self.error!r}")
        token = next(self._rids)
        future = self._lora_calls[token] = asyncio.get_running_loop().create_future()
        self._send(("lora", token, op, arg))
        return await future

    def _lora_done(self, token: int, error: str | None) -> None:
        future = self._lora_calls.pop(token, None)
        if future is not None and not future.done():
            future.set_result(error)

    def abort(self, handle: RequestHandle, choices=None) -> None:
        """End the request's choices (``choices``: their indices; default all) and free their KV blocks."""
        ending = [i for i in (handle.open.copy() if choices is None else choices) if i in handle.open]
        if handle.rid is None or not ending:
            return
        handle.open.difference_update(ending)
        if not handle.open:
            self._handles.pop(handle.rid, None)
        self._send(("abort", handle.rid, ending))

    def stats(self) -> dict:
        with self._lock:
            return dict(self._snapshot, waiting=self._snapshot["waiting"] + self._submitted - self._added)

    def _dispatch(self, events) -> None:
        for rid, i, delta in events:
            handle = self._handles.get(rid)
            if handle is None or i not in handle.open:
                continue
            if delta.finish_reason is not None:
                handle.open.discard(i)
                if not handle.open:
                    del self._handles[rid]
            handle.queue.put_nowait((i, delta))

    def _fail_all(self, error: BaseException) -> None:
        for handle in self._handles.values():
            handle.queue.put_nowait((None, error))
            handle.open.clear()
        self._handles.clear()
        for future in self._lora_calls.values():
            if not future.done():
                future.set_exception(EngineDead(f"the engine failed: {error!r}"))
        self._lora_calls.clear()

    # ---- the writer and reader threads --------------------------------------------------------------
    def _send(self, command) -> None:
        self._outbox.append(command)
        self._wake.set()

    def _write(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            while self._outbox:
                command = self._outbox.popleft()
                try:
                    self._to_core.send_bytes(dumps(command))
                except OSError:  # the engine is gone; the reader reports it
                    return
                if command[0] == "stop":
                    return

    def _read(self) -> None:
        try:
            while True:
                message = pickle.loads(self._from_core.recv_bytes())
                if message[0] == "step":
                    _, events, snapshot, added = message
                    with self._lock:
                        self._snapshot, self._added = snapshot, added
                    if events:
                        self._loop.call_soon_threadsafe(self._dispatch, events)
                elif message[0] == "lora":
                    self._loop.call_soon_threadsafe(self._lora_done, message[1], message[2])
                elif message[0] == "failed":
                    self._fail(RuntimeError(message[1]))
                    return
                else:  # "stopped"
                    return
        except (EOFError, OSError):
            if not self._stopping:
                code = None
                if self._process is not None:
                    self._process.join(5)
                    code = self._process.exitcode
                self._fail(EngineDead(f"the engine process exited (code {code})"))

    def _fail(self, error: BaseException) -> None:
        with self._lock:  # against ``submit``: a request either sees the error or is among those failed
            self.error = error
        logger.error("the engine failed: %s", error)
        try:
            self._loop.call_soon_threadsafe(self._fail_all, error)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass
