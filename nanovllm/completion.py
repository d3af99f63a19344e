"""``Completion``: one sequence's completion built from the engine's outputs (``engine/outputs.py``); the one
output processor of ``LLM.generate``, ``LLM.chat`` and the server.

Rules, the same offline and online (vLLM's defaults):
* The text is ``detokenizer.decode`` of the tokens that count (special tokens skipped, spaces not cleaned up),
  built incrementally by a ``TextStream`` when the caller streams it or the request has stop strings.
* A stop token (EOS or ``stop_token_ids``) ends the completion with "stop": it stays in ``token_ids`` (and in
  usage counts), and its text is not part of the text (unless ``include_stop_str_in_output``, and then only if
  ``skip_special_tokens`` leaves it: EOS is special).
* A stop string ends it with "stop": the text ends just before it (after it with ``include_stop_str_in_output``),
  ``token_ids`` with the token that completed it, and ``stopped_by_string`` tells the caller to abort the
  engine's sequence.
* ``skip_special_tokens`` (default True) leaves special tokens' text out.
* ``logprobs`` has one entry per token that counts; ``prompt_logprobs`` (when asked) one per prompt token.
"""
from dataclasses import dataclass

from nanovllm.detokenizer import TextStream, decode
from nanovllm.engine.outputs import SequenceOutput
from nanovllm.sampling_params import SamplingParams


def logprob_dict(token: int, chosen: float, top_ids: list[int], top: list[float]) -> dict:
    """One position's logprobs as ``{token id: logprob}``: the token itself first, then the most likely ones."""
    return {token: chosen, **dict(zip(top_ids, top))}


@dataclass
class CompletionDelta:
    text: str  # new text safe to show (always "" for a completion that is not incremental)
    token_ids: list[int]  # new tokens that count
    logprobs: list | None  # per token (logprob, top ids, top logprobs)
    finish_reason: str | None  # set once, on the completion's last delta
    prompt_logprobs: list | None = None  # new prompt positions' entries (``SequenceOutput.prompt_logprobs``)


class Completion:
    def __init__(self, tokenizer, params: SamplingParams, incremental: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = params.skip_special_tokens
        self.include_stop_token = params.include_stop_str_in_output
        self.stream = TextStream(tokenizer, params.stop, params.skip_special_tokens,
                                 params.include_stop_str_in_output, params.min_tokens) \
            if tokenizer is not None and (incremental or params.stop) else None
        self.token_ids: list[int] = []
        self.logprobs: list | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list | None = [] if params.prompt_logprobs is not None else None
        self.finish_reason: str | None = None
        self._stop_token = False

    @property
    def stopped_by_string(self) -> bool:
        return self.stream is not None and self.stream.stopped

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the completion, if one did."""
        return self.stream.stop_string if self.stopped_by_string else None

    def add(self, output: SequenceOutput) -> CompletionDelta:
        """Take the engine's next output of this sequence (ignored once the completion finished)."""
        if self.finish_reason is not None:
            return CompletionDelta("", [], [] if self.logprobs is not None else None, self.finish_reason)
        prompt_logprobs = output.prompt_logprobs
        if self.prompt_logprobs is not None and prompt_logprobs:
            self.prompt_logprobs += prompt_logprobs
        tokens = output.token_ids
        stop_token = output.finish_reason == "stop" and bool(tokens) and not self.include_stop_token
        text = ""
        if self.stream is not None:
            before = self.stream.num_tokens
            text = self.stream.push(tokens[:-1] if stop_token else tokens)
            if stop_token:
                self.stream.skip(tokens[-1:])
            kept = self.stream.num_tokens - before
        else:
            kept = len(tokens)
        kept_tokens = tokens[:kept] if kept < len(tokens) else tokens
        self.token_ids += kept_tokens
        logprobs = None
        if self.logprobs is not None:
            logprobs = output.logprobs[:kept]
            self.logprobs += logprobs
        if self.stopped_by_string:
            self.finish_reason = "stop"
        elif output.finish_reason is not None:
            self.finish_reason = output.finish_reason
            self._stop_token = stop_token
            if self.stream is not None:
                text += self.stream.finish()
        return CompletionDelta(text, kept_tokens, logprobs, self.finish_reason, prompt_logprobs)

    @property
    def text(self) -> str:
        """The whole text so far (of a finished completion: its final text)."""
        if self.stream is not None:
            return self.stream.text
        if self.tokenizer is None:
            return ""
        return decode(self.tokenizer, self.token_ids[:-1] if self._stop_token else self.token_ids,
                      self.skip_special_tokens)

    def output(self) -> dict:
        """``LLM.generate``'s output of a finished completion: text, token ids, finish reason, if asked logprobs as
        one dict ``{token id: logprob}`` per token (the sampled token, then the most likely ones), and
        ``prompt_logprobs``: None unless asked, else per prompt token None (the first) or such a dict (the prompt
        token, then the most likely ones)."""
        out = {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason}
        if self.logprobs is not None:
            out["logprobs"] = [logprob_dict(token, *entry) for token, entry in zip(self.token_ids, self.logprobs)]
        out["prompt_logprobs"] = None if self.prompt_logprobs is None else \
            [None if e is None else logprob_dict(*e) for e in self.prompt_logprobs]
        return out
