"""What one engine step reports: ``StepResult``, with one ``SequenceOutput`` per sequence that got tokens or ended.

Contract of a ``SequenceOutput``: ``token_ids`` are the sequence's completion tokens resolved since its previous
output (with their logprobs, when asked); ``finish_reason`` is set on its last output only ("stop": EOS or a stop
token, "length"), after which the engine reports nothing more for it.  A stop token is always the last token of
the output that carries ``finish_reason == "stop"``.  An aborted sequence gets no output (the caller ended it).
``prompt_logprobs`` (when asked) are the prompt positions' entries not carried before: all of them, on the first
output.  A pooling request has one output, with no tokens, finish reason "stop" and its ``embedding`` (numpy float32).
Outputs are plain data (no ``Sequence``), so they cross a pipe to the server's front unchanged.
"""
from dataclasses import dataclass
from typing import NamedTuple


@dataclass(slots=True)
class SequenceOutput:
    seq_id: int
    token_ids: list[int]
    logprobs: list | None  # per token (its logprob, top ids, top logprobs) when the request asked for logprobs
    finish_reason: str | None = None
    # per prompt position, when the request asked for prompt logprobs: None for the first, then (the prompt token,
    # its logprob, top ids, top logprobs)
    prompt_logprobs: list | None = None
    embedding: object = None  # a pooling request's vector, numpy float32 (``engine/pooling.py``)


class StepResult(NamedTuple):
    outputs: list[SequenceOutput]  # each sequence at most once, in the order its tokens resolved
    is_prefill: bool  # whether the step this call launched is a prefill
    num_tokens: int  # tokens the launched step computes
