"""What one step computes, as a function of ``StepInputs``: the same in eager and graph mode, prefill and decode.

``run_step`` goes from the device token buffer to the device token buffer: input tokens that the previous step
is still sampling are read from the buffer (``StepInputs.token_slots``), and every sampled token is written back
(``StepInputs.out_slots``), so queued steps never wait for the host.  Top-k / top-p need a sort of the whole
vocabulary, which costs more than the rest of a small model's decode step; the compiled step draws without them
and ``redraw_filtered`` re-draws, after the step, the rows of a batch that asked for them (same noise, so a seeded
request draws the same token in either path when its filters keep the winner).
"""
import functools

import torch

from nanovllm.layers.sampler import sample
from nanovllm.step.inputs import StepInputs


def run_step(model, kv_caches, token_buffer, inputs: StepInputs):
    """The whole step: (tokens [B], logits [B, V])."""
    from_buffer = token_buffer[inputs.token_slots.clamp(min=0)]
    input_ids = torch.where(inputs.token_slots >= 0, from_buffer, inputs.input_ids)
    logits = model(input_ids, inputs, kv_caches)
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
