"""What one step computes, as a function of ``StepInputs``: the same in eager and graph mode, prefill and decode.

``run_step`` goes from the device token buffer to the device token buffer: input tokens still being sampled are
read from it (``StepInputs.token_slots``) and every sampled token is written back (``out_slots``), so queued steps
never wait for the host.  Top-k / top-p need a sort of the vocabulary: the compiled step draws without them (and
without min-p) and ``redraw_filtered`` re-draws, after the step, the rows of a batch that asked for them (same noise).
Variants (``STEPS``), each a code object of its own, so Dynamo compiles each apart and a batch pays only for what
its requests ask: ``logprobs`` adds, per row, fixed-size float32 logprobs of the raw logits (``token_logprobs``:
the sampled token's and the top ``MAX_LOGPROBS``); ``processed`` samples from logits a ``LogitsState`` changed
(penalties, biases, grammar masks) and counts the sampled tokens; ``processed_logprobs`` is both; ``forward`` and
``sample`` (or ``sample_logprobs``) are a processed step in two halves, between which the host fills masks.  When
``redraw_filtered`` replaces a row's token, ``rechoose_logprob`` recomputes its logprob from the step's outputs
(the log-normaliser follows from the top token's raw logit and logprob) and the state's counts follow the new token.
Every step that runs the model also returns, last, the final normed hidden states of all its tokens [T, H] (what
``engine/pooling.py`` pools into embeddings): an output the step computes anyway, so it costs no work.
"""
import functools

import torch

from nanovllm.layers.sampler import sample
from nanovllm.sampling_params import MAX_LOGPROBS
from nanovllm.step.inputs import StepInputs
from nanovllm.step.logits_state import LogitsState


def _forward(model, kv_caches, token_buffer, inputs: StepInputs, mm):
    """(logits [B, V] of the rows ``inputs.logits_indices``, the final normed hidden states [T, H])."""
    from_buffer = token_buffer[inputs.token_slots.clamp(min=0)]
    input_ids = torch.where(inputs.token_slots >= 0, from_buffer, inputs.input_ids)
    hidden = model.hidden_states(input_ids, inputs, kv_caches, mm)
    return model.logits(hidden[inputs.logits_indices]), hidden


def sample_tokens(token_buffer, logits, inputs: StepInputs) -> torch.Tensor:
    """Draw each row's token from ``logits`` (no top-k / top-p: ``redraw_filtered``) into the token buffer."""
    tokens = sample(logits, inputs.temperature, inputs.top_k, inputs.top_p, inputs.seeds, inputs.sample_positions)
    token_buffer.index_copy_(0, inputs.out_slots, tokens)
    return tokens


def run_step(model, kv_caches, token_buffer, inputs: StepInputs, mm=None):
    """The whole step: (tokens [B], logits [B, V], hidden states [T, H]).  ``mm``: a vision-language model's extra
    inputs for a prefill chunk with image tokens (``nanovllm/models/qwen_vl.py``), handed to the model."""
    logits, hidden = _forward(model, kv_caches, token_buffer, inputs, mm)
    return sample_tokens(token_buffer, logits, inputs), logits, hidden


def run_step_with_logprobs(model, kv_caches, token_buffer, inputs: StepInputs, mm=None):
    """``run_step`` and its logprobs: (tokens [B], logits [B, V], values [B, 1 + MAX_LOGPROBS], ids
    [B, MAX_LOGPROBS], hidden states) (see ``token_logprobs``).  A code object of its own, so Dynamo compiles it
    apart from ``run_step``."""
    tokens, logits, hidden = run_step(model, kv_caches, token_buffer, inputs, mm)
    values, ids = token_logprobs(logits, tokens)
    return tokens, logits, values, ids, hidden


def run_processed_step(model, kv_caches, token_buffer, state: LogitsState, inputs: StepInputs, mm=None):
    """``run_step`` for a batch in which a request has penalties or a grammar: the sampler draws from the logits
    ``state`` processed, and the sampled tokens are counted.  (tokens [B], processed logits [B, V], raw logits,
    hidden states)."""
    raw, hidden = _forward(model, kv_caches, token_buffer, inputs, mm)
    return sample_processed(token_buffer, state, raw, inputs) + (hidden,)


def run_forward(model, kv_caches, token_buffer, state: LogitsState, inputs: StepInputs, mm=None):
    """A split step's first half, for a batch whose grammar masks are filled while it runs: the model's logits,
    kept in ``state.logits`` by token slot for the second half (``run_sample``).  Returns (raw logits [B, V],
    hidden states)."""
    raw, hidden = _forward(model, kv_caches, token_buffer, inputs, mm)
    state.keep(raw, inputs.out_slots)
    return raw, hidden


def run_sample(token_buffer, state: LogitsState, inputs: StepInputs, mm=None):
    """A split step's second half: ``run_processed_step`` on the logits its first half kept, with the same
    inputs; no model runs, so its hidden states are None."""
    return sample_processed(token_buffer, state, state.logits.index_select(0, inputs.out_slots), inputs) + (None,)


def run_sample_with_logprobs(token_buffer, state: LogitsState, inputs: StepInputs, mm=None):
    """``run_sample`` and the logprobs of the raw logits, as ``run_processed_step_with_logprobs``."""
    tokens, logits, raw, _ = run_sample(token_buffer, state, inputs)
    values, ids = token_logprobs(raw, tokens)
    return tokens, logits, values, ids, raw, None


def sample_processed(token_buffer, state: LogitsState, raw: torch.Tensor, inputs: StepInputs):
    """Sample from ``raw`` logits processed by ``state``, write the tokens to the token buffer and count them:
    (tokens [B], processed logits [B, V], raw)."""
    logits = state.process(raw, inputs.out_slots, inputs.sample_positions)
    tokens = sample_tokens(token_buffer, logits, inputs)
    state.count(inputs.out_slots, tokens)
    return tokens, logits, raw


def run_processed_step_with_logprobs(model, kv_caches, token_buffer, state: LogitsState, inputs: StepInputs,
                                     mm=None):
    """``run_processed_step`` and the logprobs of the raw logits (as every step reports them): (tokens, logits,
    values, ids, raw logits, hidden states)."""
    tokens, logits, raw, hidden = run_processed_step(model, kv_caches, token_buffer, state, inputs, mm)
    values, ids = token_logprobs(raw, tokens)
    return tokens, logits, values, ids, raw, hidden


STEPS = {None: run_step, "logprobs": run_step_with_logprobs, "processed": run_processed_step,
         "processed_logprobs": run_processed_step_with_logprobs, "forward": run_forward, "sample": run_sample,
         "sample_logprobs": run_sample_with_logprobs}  # the step and its variants, by name
VARIANTS = tuple(name for name in STEPS if name is not None)


def variant_name(logprobs: bool, processed: bool) -> str | None:
    """The variant a batch runs: ``None`` (the plain step) unless a request asks for logprobs or processing."""
    return {(False, False): None, (True, False): "logprobs", (False, True): "processed",
            (True, True): "processed_logprobs"}[(bool(logprobs), bool(processed))]


def make_step(model, kv_caches, token_buffer, variant: str | None = None, state: LogitsState | None = None):
    """``step(inputs)``: ``STEPS[variant]`` (the processed ones take ``state``).  The model and tensors are
    bound arguments, not a closure: a compiled step saved to the compile cache then reads this process's objects
    when loaded (``nanovllm/compile/saved_step.py``)."""
    if variant in ("sample", "sample_logprobs"):  # no model: the logits come from ``state``
        return functools.partial(STEPS[variant], token_buffer, state)
    bound = (model, kv_caches, token_buffer) + ((state,) if variant in ("processed", "processed_logprobs",
                                                                         "forward") else ())
    return functools.partial(STEPS[variant], *bound)


def redraw_filtered(token_buffer, logits, inputs: StepInputs, rows: int, drawn: torch.Tensor,
                    state: LogitsState | None = None) -> torch.Tensor:
    """Re-draw the first ``rows`` rows of a step with their min-p / top-k / top-p filters and write them back to the
    token buffer; returns the tokens [rows].  ``drawn``: the tokens the step drew, which a processed step counted
    in ``state``: the count moves to the new token."""
    tokens = sample(logits[:rows], inputs.temperature[:rows], inputs.top_k[:rows], inputs.top_p[:rows],
                    inputs.seeds[:rows], inputs.sample_positions[:rows], filtered=True, min_p=inputs.min_p[:rows])
    token_buffer.index_copy_(0, inputs.out_slots[:rows], tokens)
    if state is not None:
        state.count(inputs.out_slots[:rows], drawn[:rows], -1)
        state.count(inputs.out_slots[:rows], tokens)
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
