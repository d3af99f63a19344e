"""``EngineCore``: the server's engine side.  It steps one engine and talks to the front (``engine_loop.py``) over a
pair of pipes only, so it runs the same in a thread or in a process of its own (``engine_process.py``, the default).

Messages, each one pickle (``send_bytes``):
* front -> core: ``("add", rid, prompt_ids, [SamplingParams per choice], ImageInputs or None, LoRARequest or
  None)``, ``("abort", rid, [choice indices] or None for all)``, ``("lora", token, "load" or "remove", LoRARequest
  or its id)`` (``Engine.add_lora``/``remove_lora``), ``("stop",)``.
* core -> front: ``("step", [(rid, choice, SequenceOutput)], snapshot, added)`` after each step, and after commands
  that arrived while the engine was idle (``snapshot``: running, waiting, KV usage, prefix cache and speculative
  totals; ``added``: sequences handed to the engine so far); ``("lora", token, None or the error's message)``;
  ``("failed", message)`` if the engine raised, after which the core stops; ``("stopped",)`` after a ``stop``.
The outputs are the engine's own (``nanovllm/engine/outputs.py``), each tagged with its request and choice.
``abort`` ends the choices at once and frees their KV blocks (``Engine.abort``); nothing more is sent for them.  A
request whose choices all ended is forgotten.  The core stops, closing the engine's LLM, on ``stop`` or when the
front's pipe closes.
"""
import pickle

from nanovllm.logger import logger


def dumps(message) -> bytes:
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


class EngineCore:
    def __init__(self, engine):
        self.engine = engine
        self.added = 0  # sequences handed to the engine so far
        self._live: dict[int, tuple] = {}  # seq_id -> (rid, choice)
        self._seqs: dict[int, list] = {}  # rid -> its sequences (None once ended), by choice

    def apply(self, command) -> tuple | None:
        """Run one ``add``, ``abort`` or ``lora`` command; the reply to send (``lora``'s), or None."""
        if command[0] == "add":
            _, rid, prompt_ids, params, images, *lora = command
            seqs = []
            for i, p in enumerate(params):
                seq = self.engine.add_request(prompt_ids, p, images, *lora)
                self._live[seq.seq_id] = (rid, i)
                seqs.append(seq)
            self._seqs[rid] = seqs
            self.added += len(params)
        elif command[0] == "abort":
            _, rid, choices = command
            seqs = self._seqs.get(rid)
            if seqs is None:
                return
            for i in range(len(seqs)) if choices is None else choices:
                seq = seqs[i]
                if seq is not None and self._live.pop(seq.seq_id, None) is not None:
                    self.engine.abort(seq)
                seqs[i] = None
            self._forget_if_done(rid)
        elif command[0] == "lora":
            _, token, op, arg = command
            try:
                (self.engine.add_lora if op == "load" else self.engine.remove_lora)(arg)
            except (ValueError, TypeError, OSError) as e:
                return ("lora", token, str(e))
            return ("lora", token, None)
        else:
            raise ValueError(f"unknown engine command {command[0]!r}")

    def step(self) -> list:
        """One engine step; returns its outputs as ``(rid, choice, SequenceOutput)``."""
        events = []
        for out in self.engine.step().outputs:
            entry = self._live.get(out.seq_id)
            if entry is None:
                continue
            rid, i = entry
            if out.finish_reason is not None:
                del self._live[out.seq_id]
                self._seqs[rid][i] = None
                self._forget_if_done(rid)
            events.append((rid, i, out))
        return events

    def snapshot(self) -> dict:
        engine = self.engine
        bm = engine.block_manager
        return {"running": len(engine.scheduler.running), "waiting": len(engine.scheduler.waiting),
                "kv_cache_usage": 1.0 - bm.num_free_blocks / bm.num_blocks,
                "prefix_cache_queries": bm.prefix_cache_queries, "prefix_cache_hits": bm.prefix_cache_hits,
                **{k: engine.stats[k] for k in ("spec_drafts", "spec_proposed_tokens", "spec_accepted_tokens",
                                                "spec_accepted_by_position")}}

    def _forget_if_done(self, rid: int) -> None:
        if all(s is None for s in self._seqs[rid]):
            del self._seqs[rid]

    def serve(self, inbox, outbox) -> None:
        """Run commands from ``inbox`` and step between them until ``stop`` or until the front's end closes;
        report every step on ``outbox``."""
        engine = self.engine
        try:
            while True:
                # between steps take what has arrived; idle, wait for the next command
                while inbox.poll(0 if engine.has_work() else None):
                    command = pickle.loads(inbox.recv_bytes())
                    if command[0] == "stop":
                        outbox.send_bytes(dumps(("stopped",)))
                        return
                    reply = self.apply(command)
                    if reply is not None:
                        outbox.send_bytes(dumps(reply))
                events = self.step() if engine.has_work() else []
                outbox.send_bytes(dumps(("step", events, self.snapshot(), self.added)))
        except (EOFError, BrokenPipeError, ConnectionResetError):  # the front is gone
            return
        except BaseException as e:  # noqa: BLE001 - reported to the front, which fails every request
            logger.exception("engine loop failed")
            try:
                outbox.send_bytes(dumps(("failed", repr(e))))
            except OSError:
                pass
