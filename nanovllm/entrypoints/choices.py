"""Running one API request: its sequences' deltas turned into per-choice text, tokens and logprobs.

``run_choices`` is an async generator over a submitted request: for each engine delta of a choice it yields a
``ChoiceUpdate`` (new text safe to show, the tokens and logprobs that count, and the finish reason on the last
one).  A stop token's text (EOS or ``stop_token_ids``) is left out, as OpenAI servers do (offline
``LLM.generate`` keeps a non-special stop token's text).  Stop strings are applied here (``TextStream``): the
choice ends with finish reason "stop" and its sequence is aborted, so its KV is freed at once.  If the consumer
stops early (a client that went away), every unfinished choice is aborted and counted as finished on "abort".
Usage counts are exact: a choice counts the tokens up to the one that completed its stop string.

When deltas queue up faster than the request is served (a busy front at saturation), they are taken together and
each choice's are joined into one update, as vLLM's output collector does: one chunk then carries several tokens,
so the front's work per token falls as its load rises instead of falling behind further.
"""
import dataclasses
import time

from nanovllm.detokenizer import TextStream
from nanovllm.entrypoints.engine_core import SeqDelta
from nanovllm.entrypoints.protocol import APIError


@dataclasses.dataclass
class ChoiceUpdate:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list | None  # per token (logprob, top ids, top logprobs)
    finish_reason: str | None


class Choice:
    def __init__(self, index: int, tokenizer, stop):
        self.index = index
        self.stream = TextStream(tokenizer, stop)
        self.finish_reason: str | None = None
        self.last_token_time: float | None = None

    @property
    def num_tokens(self) -> int:
        return self.stream.num_tokens

    def add(self, delta) -> ChoiceUpdate:
        before = self.stream.num_tokens
        tokens = delta.token_ids
        if delta.finish_reason == "stop" and tokens:  # ended by its EOS or a stop token: not part of the text
            text = self.stream.push(tokens[:-1])
            self.stream.skip(tokens[-1:])
        else:
            text = self.stream.push(tokens)
        kept = self.stream.num_tokens - before
        logprobs = delta.logprobs[:kept] if delta.logprobs is not None else None
        if self.stream.stopped:
            self.finish_reason = "stop"
        elif delta.finish_reason is not None:
            text += self.stream.finish()
            self.finish_reason = delta.finish_reason
        return ChoiceUpdate(self.index, text, delta.token_ids[:kept], logprobs, self.finish_reason)


async def run_choices(loop, handle, tokenizer, metrics):
    """Yield ``ChoiceUpdate``s of every choice of ``handle`` until all are finished (see the module docstring)."""
    choices = [Choice(i, tokenizer, p.stop) for i, p in enumerate(handle.params)]
    open_choices = len(choices)
    counted_prompt = False  # a request's prompt is counted once, whatever its ``n``
    try:
        while open_choices:
            for index, delta in queued(handle.queue, await handle.queue.get()):
                if delta.error is not None:
                    raise APIError(500, f"the engine failed: {delta.error!r}")
                choice = choices[index]
                if choice.finish_reason is not None:  # stopped by a stop string; the engine had sent more already
                    continue
                update = choice.add(delta)
                if delta.token_ids and not counted_prompt:
                    metrics.prompt(len(handle.prompt_ids))
                    counted_prompt = True
                _observe(metrics, handle, choice, update, len(delta.token_ids))
                if update.finish_reason is not None:
                    open_choices -= 1
                    if delta.finish_reason is None:  # a stop string ended it: the engine still runs it
                        loop.abort(handle, [index])
                yield update
    finally:
        unfinished = [c.index for c in choices if c.finish_reason is None]
        if unfinished:
            loop.abort(handle, unfinished)
            for _ in unfinished:
                metrics.finished("abort", time.perf_counter() - handle.arrival)


def queued(queue, first: tuple) -> list[tuple]:
    """``first`` and every ``(choice index, SeqDelta)`` already in ``queue``, each choice's deltas joined into one
    (tokens and logprobs in order, the last one's finish reason), in order of each choice's first delta.  An
    error delta is returned alone."""
    joined: dict[int, SeqDelta] = {}
    event = first
    while True:
        index, delta = event
        if delta.error is not None:
            return [event]
        before = joined.get(index)
        if before is None:
            joined[index] = delta
        else:
            logprobs = before.logprobs + delta.logprobs if before.logprobs is not None else None
            joined[index] = SeqDelta(before.token_ids + delta.token_ids, logprobs, delta.finish_reason)
        if queue.empty():
            return list(joined.items())
        event = queue.get_nowait()


def _observe(metrics, handle, choice: Choice, update: ChoiceUpdate, generated: int) -> None:
    now = time.perf_counter()
    if generated:
        if choice.last_token_time is None:
            metrics.first_token(now - handle.arrival)
        else:
            metrics.inter_token(now - choice.last_token_time, generated)
        choice.last_token_time = now
        metrics.generated(generated)
    if update.finish_reason is not None:
        metrics.finished(update.finish_reason, now - handle.arrival)
