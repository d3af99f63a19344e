"""What one step computes, as a function of ``StepInputs``: the same in eager and graph mode, prefill and decode.

``run_step`` goes from the device token buffer to the device token buffer: input tokens that the previous step
is still sampling are read from the buffer (``StepInputs.token_slots``), and every sampled token is written back
(``StepInputs.out_slots``), so queued steps never wait for the host.  Top-k / top-p need a sort of the whole
vocabulary, which costs more than the rest of a small model's decode step; the compiled step draws without them
and ``redraw_filtered`` re-draws, after the step, the rows of a batch that asked for them (same noise, so a seeded
request draws the same token in either path when its filters keep the winner).

Logprobs (``token_logprobs``) are likewise computed after the step, from the logits it returns, and only for a
batch in which a request asked for them: a fixed-size result (the sampled token's logprob and the top
``MAX_LOGPROBS``) whatever each request's ``k``, so a batch's cost does not depend on what its requests asked.
"""
import functools

import torch

from nanovllm.layers.sampler import sample
from nanovllm.sampling_params import MAX_LOGPROBS
from nanovllm.step.inputs import StepInputs


def run_step(model, kv_caches, token_buffer, inputs: StepInputs, mm=None):
    """The whole step: (tokens [B], logits [B, V]).  ``mm``: a vision-language model's extra inputs for a prefill
    chunk with image tokens (``nanovllm/models/qwen_vl.py``), handed to the model."""
    from_buffer = token_buffer[inputs.token_slots.clamp(min=0)]
    input_ids = torch.where(inputs.token_slots >= 0, from_buffer, inputs.input_ids)
    logits = model(input_ids, inputs, kv_caches) if mm is None else model(input_ids, inputs, kv_caches, mm)
    tokens = sample(logits, inputs.temperature, inputs.top_k, inputs.top_p, inputs.seeds, inputs.sample_positions)
    token_buffer.index_copy_(0, inputs.out_slots, tokens)
    return tokens, logits


def make_step(model, kv_caches, token_buffer):
    """``step(inputs)``.  The model and tensors are bound arguments, not a closure: a compiled step saved to
    the compile cache then reads this process's objects when loaded (``nanovllm/compile/saved_step.py``)."""
    return functools.partial(run_step, model, kv_caches, token_buffer)


def redraw_filtered(token_buffer, logits, inputs: StepInputs, rows: int) -> torch.Tensor:
    """Re-draw the first ``rows`` rows of a step with their top-k / top-p filters and write them back to the
    token buffer; returns the tokens [rows]."""
    tokens = sample(logits[:rows], inputs.temperature[:rows], inputs.top_k[:rows], inputs.top_p[:rows],
                    inputs.seeds[:rows], inputs.sample_positions[:rows], filtered=True)
    token_buffer.index_copy_(0, inputs.out_slots[:rows], tokens)
    return tokens


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For the first ``rows`` rows, from the raw logits (before temperature and filters): values
    [rows, 1 + MAX_LOGPROBS] float32 (the sampled token's logprob, then the top logprobs in descending order) and
    ids [rows, MAX_LOGPROBS] int64 (the top tokens).  A vocabulary smaller than ``MAX_LOGPROBS`` repeats its last
    entry to fill the row."""
    logprobs = logits[:rows].float().log_softmax(dim=-1)
    chosen = logprobs.gather(1, tokens[:rows, None])
    top, ids = logprobs.topk(min(MAX_LOGPROBS, logprobs.shape[-1]), dim=-1)
    if top.shape[-1] < MAX_LOGPROBS:
        fill = MAX_LOGPROBS - top.shape[-1]
        top, ids = torch.cat([top, top[:, -1:].expand(-1, fill)], 1), torch.cat([ids, ids[:, -1:].expand(-1, fill)], 1)
    return torch.cat([chosen, top], dim=1), ids
