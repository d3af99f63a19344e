"""What one engine step reports: ``StepResult``, with one ``SequenceOutput`` per sequence that got tokens or ended.

Contract of a ``SequenceOutput``: ``token_ids`` are the sequence's completion tokens resolved since its previous
output (with their logprobs, when asked); ``finish_reason`` is set on its last output only ("stop": EOS or a stop
token, "length"), after which the engine reports nothing more for it.  A stop token is always the last token of
the output that carries ``finish_reason == "stop"``.  An aborted sequence gets no output (the caller ended it).
``prompt_logprobs`` (when asked) are the prompt positions' entries not carried before: all of them, on the first
output.  A pooling request has one output, with no tokens, finish reason "stop" and its ``embedding`` (numpy float32).
Outputs are plain data (no ``Sequence``), so they cross a pipe to the server's front unchanged; ``step_outputs``
makes a resolved step's from its sequences.
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


def step_outputs(batch, finished: list) -> list[SequenceOutput]:
    """The outputs of a resolved step: each sequence it wrote a token into, then each other one it finished.

    Steps resolve in launch order, so the token a step wrote at ``index`` is its sequence's newest resolved one.
    A sequence finished on length when a later step launched, whose token resolved here is a stop token, is
    reported once, with the finish reason "stop", when that later step resolves and finishes it."""
    done = set(finished)
    outputs = []
    for _, seq, index in batch.sampled:
        tokens = seq.token_ids
        if index >= len(tokens):  # cut after an EOS resolved earlier, or aborted
            continue
        ends = seq in done
        if ends:
            done.discard(seq)
        elif seq.finish_reason == "stop":
            continue
        outputs.append(sequence_output(seq, index + 1, ends))
    for seq in finished:
        if seq in done:
            outputs.append(sequence_output(seq, seq.num_resolved_tokens, True))
    return outputs


def sequence_output(seq, resolved: int, ends: bool) -> SequenceOutput:
    """``seq``'s tokens past those reported, up to its first ``resolved`` tokens, and its prompt logprobs not
    reported yet (all of them come with its first output: the steps that computed them resolved before)."""
    start, end = seq.num_reported_tokens, resolved - seq.num_prompt_tokens
    seq.num_reported_tokens = end
    logprobs = seq.logprobs[start:end] if seq.logprobs is not None else None
    prompt = None
    if seq.prompt_logprobs is not None:
        prompt = seq.prompt_logprobs[seq.num_reported_prompt_logprobs:]
        seq.num_reported_prompt_logprobs = len(seq.prompt_logprobs)
    return SequenceOutput(seq.seq_id, seq.token_ids[seq.num_prompt_tokens + start:resolved], logprobs,
                          seq.finish_reason if ends else None, prompt, seq.embedding)
