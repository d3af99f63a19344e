"""What one step computes, as a function of ``StepInputs``: the same in eager and graph mode, prefill and decode.

``run_step`` goes from the device token buffer to the device token buffer: input tokens that the previous step
is still sampling are read from the buffer (``StepInputs.token_slots``), and every sampled token is written back
(``StepInputs.out_slots``), so queued steps never wait for the host.  Top-k / top-p need a sort of the whole
vocabulary, which costs more than the rest of a small model's decode step; the compiled step draws without them
and ``redraw_filtered`` re-draws, after the step, the rows of a batch that asked for them (same noise, so a seeded
request draws the same token in either path when its filters keep the winner).

Logprobs come out of the step itself: ``run_step_with_logprobs`` is ``run_step`` plus, for every row, a
fixed-size float32 result computed from the logits the sampler drew from (``token_logprobs``: the sampled token's
logprob and the top ``MAX_LOGPROBS``) whatever each request's ``k``, so its shapes are static and a compiled
variant is one graph per bucket.  A batch none of whose requests asked for logprobs runs plain ``run_step`` and
pays nothing for them.  When ``redraw_filtered`` replaces a row's token, ``rechoose_logprob`` recomputes its
logprob from the step's outputs (the log-normaliser follows from the top token's logit and logprob).
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


def run_step_with_logprobs(model, kv_caches, token_buffer, inputs: StepInputs, mm=None):
    """``run_step`` and its logprobs: (tokens [B], logits [B, V], values [B, 1 + MAX_LOGPROBS], ids
    [B, MAX_LOGPROBS]) (see ``token_logprobs``).  A code object of its own, so Dynamo compiles it apart from
    ``run_step``."""
    tokens, logits = run_step(model, kv_caches, token_buffer, inputs, mm)
    values, ids = token_logprobs(logits, tokens)
    return tokens, logits, values, ids


def make_step(model, kv_caches, token_buffer, logprobs: bool = False):
    """``step(inputs)``: ``run_step``, or ``run_step_with_logprobs`` with ``logprobs``.  The model and tensors are
    bound arguments, not a closure: a compiled step saved to the compile cache then reads this process's objects
    when loaded (``nanovllm/compile/saved_step.py``)."""
    return functools.partial(run_step_with_logprobs if logprobs else run_step, model, kv_caches, token_buffer)


def redraw_filtered(token_buffer, logits, inputs: StepInputs, rows: int) -> torch.Tensor:
    """Re-draw the first ``rows`` rows of a step with their top-k / top-p filters and write them back to the
    token buffer; returns the tokens [rows]."""
    tokens = sample(logits[:rows], inputs.temperature[:rows], inputs.top_k[:rows], inputs.top_p[:rows],
                    inputs.seeds[:rows], inputs.sample_positions[:rows], filtered=True)
    token_buffer.index_copy_(0, inputs.out_slots[:rows], tokens)
    return tokens


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, from the raw logits (before temperature and filters), in float32: values [B, 1 + MAX_LOGPROBS]
    (the sampled token's logprob, then the top logprobs in descending order) and ids [B, MAX_LOGPROBS] int64 (the
    top tokens).  A vocabulary smaller than ``MAX_LOGPROBS`` repeats its last entry to fill the row.

    log_softmax(x) = x - logsumexp(x), so only the logits the result holds are normalised: no [B, V] logprobs
    tensor is made (the top k of the logits are the top k of their logprobs)."""
    log_norm = torch.logsumexp(logits.float(), dim=-1, keepdim=True)
    chosen = logits.gather(1, tokens[:, None]).float() - log_norm
    top, ids = logits.topk(min(MAX_LOGPROBS, logits.shape[-1]), dim=-1)
    top = top.float() - log_norm
    if top.shape[-1] < MAX_LOGPROBS:
        fill = MAX_LOGPROBS - top.shape[-1]
        top, ids = torch.cat([top, top[:, -1:].expand(-1, fill)], 1), torch.cat([ids, ids[:, -1:].expand(-1, fill)], 1)
    return torch.cat([chosen, top], dim=1), ids


def rechoose_logprob(logits: torch.Tensor, values: torch.Tensor, ids: torch.Tensor, tokens: torch.Tensor,
                     rows: int) -> torch.Tensor:
    """``values`` of the first ``rows`` rows with column 0 the logprob of ``tokens`` (re-drawn after the step):
    logit(token) - logsumexp, where logsumexp = logit(top token) - its logprob."""
    log_norm = logits[:rows].gather(1, ids[:rows, :1]).float() - values[:rows, 1:2]
    chosen = logits[:rows].gather(1, tokens[:rows, None]).float() - log_norm
    return torch.cat([chosen, values[:rows, 1:]], dim=1)
