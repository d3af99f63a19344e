"""``EngineLoop``: one background thread steps the engine while requests come and go on the asyncio side.

Contract:
* Only the engine thread touches the engine and its ``Sequence``s.  The asyncio side talks to it through an inbox
  (``submit``, ``abort``: thread-safe, non-blocking) and hears back through each request's ``asyncio.Queue``, fed
  once per engine step with one ``call_soon_threadsafe``.
* New requests join the running batch between steps.  Each engine step sends, per sequence that got tokens, a
  ``SeqDelta``: its newly resolved tokens (and logprobs), and its finish reason on the last one.  A stop token
  (EOS or ``stop_token_ids``) is always the last token of the delta that carries the finish reason "stop".  A request of
  ``n`` choices is ``n`` sequences; choice ``i`` with a seed gets ``seed + i``.
* ``abort`` ends a request's sequences at once and frees their KV blocks (``Engine.abort``), even while queued
  steps still hold their pending tokens; nothing more is sent for them.
* ``submit`` refuses (``Overloaded``) when the sequences waiting for a batch slot would pass ``max_waiting_seqs``,
  so the queue is bounded.  If the engine fails, every live request gets the error and later submits are refused.
"""
import asyncio
import dataclasses
import threading
import time
from collections import deque

from nanovllm.logger import logger


class Overloaded(Exception):
    pass


class EngineDead(Exception):
    pass


@dataclasses.dataclass
class SeqDelta:
    token_ids: list[int]
    logprobs: list | None  # per token (logprob, top ids, top logprobs), when asked
    finish_reason: str | None  # set on a sequence's last delta: "stop", "length" or "abort"
    error: BaseException | None = None


class RequestHandle:
    """One API request on the asyncio side: its queue of ``(choice index, SeqDelta)`` events."""

    def __init__(self, prompt_ids: list[int], params: list, images=None):
        self.prompt_ids, self.params, self.images = prompt_ids, params, images
        self.queue: asyncio.Queue = asyncio.Queue()
        self.arrival = time.perf_counter()
        self._seqs: list = [None] * len(params)  # engine thread only
        self._sent = [0] * len(params)  # engine thread only: completion tokens sent per choice


class EngineLoop:
    def __init__(self, llm, max_waiting_seqs: int):
        self.llm, self.engine = llm, llm.engine
        self.max_waiting_seqs = max_waiting_seqs
        self._inbox: deque = deque()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._inbox_seqs = 0  # sequences submitted and not yet handed to the engine
        self._live: dict[int, tuple[RequestHandle, int]] = {}  # seq_id -> (handle, choice), engine thread only
        self._stopping = False
        self.error: BaseException | None = None
        self._snapshot = {"running": 0, "waiting": 0, "kv_cache_usage": 0.0}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="nanovllm-engine", daemon=True)

    # ---- asyncio side -------------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread.start()

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout=30)
        if not self._thread.is_alive():  # the tensor-parallel ranks leave with the server (nanovllm/workers.py)
            self.llm.close()

    def submit(self, prompt_ids: list[int], params: list, images=None) -> RequestHandle:
        """Queue a request of ``len(params)`` sequences on one prompt (with its ``ImageInputs``, if it has images);
        raises ``Overloaded``/``EngineDead``."""
        with self._lock:  # against ``_fail``: a request either sees the error or is in the inbox it fails
            if self.error is not None:
                raise EngineDead(f"the engine failed: {self.error!r}")
            waiting = self._inbox_seqs + self._snapshot["waiting"]
            if waiting + len(params) > self.max_waiting_seqs:
                raise Overloaded(f"{waiting} sequences are waiting for a batch slot; this request's {len(params)} "
                                 f"would pass --max-waiting-seqs={self.max_waiting_seqs}")
            self._inbox_seqs += len(params)
            handle = RequestHandle(prompt_ids, params, images)
            self._inbox.append(("add", handle))
        self._wake.set()
        return handle

    def abort(self, handle: RequestHandle, choices=None) -> None:
        """End the request's sequences (``choices``: their indices; default all) and free their KV blocks."""
        self._inbox.append(("abort", handle, choices))
        self._wake.set()

    def stats(self) -> dict:
        """Sequences running and waiting, and the share of KV blocks in use, as of the last engine step."""
        with self._lock:
            return dict(self._snapshot, waiting=self._snapshot["waiting"] + self._inbox_seqs)

    @staticmethod
    def _dispatch(events) -> None:
        for handle, index, delta in events:
            handle.queue.put_nowait((index, delta))

    # ---- engine thread ------------------------------------------------------------------------------
    def _run(self) -> None:
        engine = self.engine
        try:
            while not self._stopping:
                self._wake.clear()
                self._drain()
                if not engine.has_work():
                    self._publish()
                    self._wake.wait()
                    continue
                finished, _, _ = engine.step()
                self._send(finished)
                self._publish()
        except BaseException as e:  # noqa: BLE001 - reported to every request, then the loop stops
            logger.exception("engine loop failed")
            self._fail(e)

    def _drain(self) -> None:
        engine = self.engine
        while self._inbox:
            item = self._inbox.popleft()
            handle = item[1]
            if item[0] == "add":
                for i, params in enumerate(handle.params):
                    seq = engine.add_request(handle.prompt_ids, params, handle.images)
                    handle._seqs[i] = seq
                    self._live[seq.seq_id] = (handle, i)
                with self._lock:
                    self._inbox_seqs -= len(handle.params)
                    self._snapshot["waiting"] = len(engine.scheduler.waiting)
            else:
                for i in item[2] if item[2] is not None else range(len(handle.params)):
                    seq = handle._seqs[i]
                    if seq is not None and self._live.pop(seq.seq_id, None) is not None:
                        engine.abort(seq)

    def _send(self, finished) -> None:
        done = {seq.seq_id for seq in finished}
        events = []
        for seq in dict.fromkeys(self.engine.updated_sequences() + finished):  # each once, in order
            entry = self._live.get(seq.seq_id)
            if entry is None:
                continue
            if seq.finish_reason == "stop" and seq.seq_id not in done:
                continue  # finished on length at launch, then a pending token was a stop token: sent with the end
            handle, i = entry
            start = handle._sent[i]
            end = seq.num_resolved_tokens - seq.num_prompt_tokens
            tokens = seq.token_ids[seq.num_prompt_tokens + start:seq.num_prompt_tokens + end]
            handle._sent[i] = end
            logprobs = seq.logprobs[start:end] if seq.logprobs is not None else None
            reason = None
            if seq.seq_id in done:
                reason = seq.finish_reason
                del self._live[seq.seq_id]
            if tokens or reason:
                events.append((handle, i, SeqDelta(tokens, logprobs, reason)))
        if events:
            self._loop.call_soon_threadsafe(self._dispatch, events)

    def _publish(self) -> None:
        engine = self.engine
        bm = engine.block_manager
        with self._lock:
            self._snapshot = {"running": len(engine.scheduler.running), "waiting": len(engine.scheduler.waiting),
                              "kv_cache_usage": 1.0 - bm.num_free_blocks / bm.num_blocks}

    def _fail(self, error: BaseException) -> None:
        with self._lock:
            self.error = error
            inbox = list(self._inbox)
        events = [(handle, i, SeqDelta([], None, None, error)) for handle, i in self._live.values()]
        for item in inbox:
            if item[0] == "add":
                events += [(item[1], i, SeqDelta([], None, None, error)) for i in range(len(item[1].params))]
        self._live.clear()
        if events and self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._dispatch, events)
            except RuntimeError:  # the event loop is closed: the server is shutting down
                pass
