"""Running one API request: its sequences' deltas turned into per-choice text, tokens and logprobs.

``run_choices`` is an async generator over a submitted request: for each engine output of a choice it yields a
``ChoiceUpdate`` (new text safe to show, the tokens and logprobs that count, and the finish reason on the last
one), made by the same ``Completion`` as ``LLM.generate``'s (``nanovllm/completion.py`` states the rules for stop
tokens and stop strings).  A choice a stop string ended has its sequence aborted, so its KV is freed at once.  If
the consumer stops early (a client that went away), every unfinished choice is aborted and counted as finished on
"abort".

When deltas queue up faster than the request is served (a busy front at saturation), they are taken together and
each choice's are joined into one update, as vLLM's output collector does: one chunk then carries several tokens,
so the front's work per token falls as its load rises instead of falling behind further.
"""
import dataclasses
import time

from nanovllm.completion import Completion
from nanovllm.engine.outputs import SequenceOutput
from nanovllm.entrypoints.protocol import APIError


@dataclasses.dataclass
class ChoiceUpdate:
    index: int
    text: str
    token_ids: list[int]
    logprobs: list | None  # per token (logprob, top ids, top logprobs)
    finish_reason: str | None
    prompt_logprobs: list | None = None  # new prompt positions' entries (``SequenceOutput.prompt_logprobs``)
    stop_string: str | None = None  # on the last update: the stop string that ended the choice, if one did


class Choice:
    def __init__(self, index: int, tokenizer, params):
        self.index = index
        self.completion = Completion(tokenizer, params, incremental=True)
        self.last_token_time: float | None = None

    @property
    def finish_reason(self) -> str | None:
        return self.completion.finish_reason

    def add(self, output: SequenceOutput) -> ChoiceUpdate:
        d = self.completion.add(output)
        return ChoiceUpdate(self.index, d.text, d.token_ids, d.logprobs, d.finish_reason, d.prompt_logprobs,
                            self.completion.stop_string)


async def run_choices(loop, handle, tokenizer, metrics):
    """Yield ``ChoiceUpdate``s of every choice of ``handle`` until all are finished (see the module docstring)."""
    choices = [Choice(i, tokenizer, p) for i, p in enumerate(handle.params)]
    open_choices = len(choices)
    counted_prompt = False  # a request's prompt is counted once, whatever its ``n``
    try:
        while open_choices:
            for index, delta in queued(handle.queue, await handle.queue.get()):
                if index is None:  # the engine failed (``EngineLoop``)
                    raise APIError(500, f"the engine failed: {delta!r}")
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
    """``first`` and every ``(choice index, SequenceOutput)`` already in ``queue``, each choice's outputs joined
    into one (tokens, logprobs and prompt logprobs in order, the last one's finish reason), in order of each
    choice's first one.  An engine failure ``(None, error)`` is returned alone."""
    joined: dict[int, SequenceOutput] = {}
    event = first
    while True:
        index, delta = event
        if index is None:
            return [event]
        before = joined.get(index)
        if before is None:
            joined[index] = delta
        else:
            logprobs = before.logprobs + delta.logprobs if before.logprobs is not None else None
            prompt = before.prompt_logprobs + delta.prompt_logprobs if before.prompt_logprobs is not None else None
            joined[index] = SequenceOutput(delta.seq_id, before.token_ids + delta.token_ids, logprobs,
                                           delta.finish_reason, prompt)
        if queue.empty():
            return list(joined.items())
        event = queue.get_nowait()


def _observe(metrics, handle, choice: Choice, update: ChoiceUpdate, generated: int) -> None:
    now = time.perf_counter()
    if generated:
        if choice.last_token_time is None:
            metrics.first_token(now - handle.arrival)
            if generated > 1:  # the tokens that came with the first one: no time after it
                metrics.inter_token(0.0, generated - 1)
        else:
            metrics.inter_token(now - choice.last_token_time, generated)
        choice.last_token_time = now
        metrics.generated(generated)
    if update.finish_reason is not None:
        metrics.finished(update.finish_reason, now - handle.arrival)
