"""A prefill step that also reports prompt logprobs: ``run_step_with_prompt_logprobs``, run eagerly.

It is ``run_step`` (or ``run_step_with_logprobs``) on a prefill whose tokens are all known on the host, split so
the final hidden states of every token are at hand (``model.hidden_states``); besides the sampled rows, the rows
``rows`` of the requests that asked for prompt logprobs go through the LM head (``model.logits``) in pieces of at
most ``PIECE_ROWS`` rows, so a long prompt never makes a [T, V] logits tensor, and each piece gives, per row, the
logprob of ``targets`` (the next prompt token) and the top ``MAX_LOGPROBS`` (``token_logprobs``: float32, fixed
size).  Only batches with such a request run it; the compiled step is left as it is.
"""
import torch

from nanovllm.step.function import sample_processed, sample_tokens, token_logprobs
from nanovllm.step.inputs import StepInputs
from nanovllm.step.logits_state import LogitsState

PIECE_ROWS = 1024  # rows of logits made at once: bounds the step's extra memory at PIECE_ROWS x vocabulary


def run_step_with_prompt_logprobs(model, kv_caches, token_buffer, inputs: StepInputs, rows: torch.Tensor,
                                  targets: torch.Tensor, logprobs: bool, mm=None,
                                  state: LogitsState | None = None) -> tuple:
    """(tokens [B], logits [B, V] sampled from, None or the sampled rows' (values, ids) when ``logprobs``, None or
    the raw logits (with ``state``: processed as ``run_processed_step`` does), the hidden states [T, H], the prompt
    rows' (values [n, 1 + MAX_LOGPROBS], ids [n, MAX_LOGPROBS])).  ``rows`` [n]: token rows whose next token is a
    prompt token, ``targets`` [n]: those tokens.  A prefill's inputs carry every token (no ``token_slots``)."""
    hidden = model.hidden_states(inputs.input_ids, inputs, kv_caches, mm)
    raw = model.logits(hidden[inputs.logits_indices])
    if state is not None:
        tokens, logits, _ = sample_processed(token_buffer, state, raw, inputs)
    else:
        tokens, logits = sample_tokens(token_buffer, raw, inputs), raw
    pieces = [token_logprobs(model.logits(hidden[rows[lo:lo + PIECE_ROWS]]), targets[lo:lo + PIECE_ROWS])
              for lo in range(0, rows.shape[0], PIECE_ROWS)]
    prompt = (torch.cat([v for v, _ in pieces]), torch.cat([i for _, i in pieces]))
    return (tokens, logits, token_logprobs(raw, tokens) if logprobs else None, raw if state is not None else None,
            hidden, prompt)
