"""Logits processing in pure torch: the twin of ``nanovllm::process_logits`` (sampling penalties and token masks).

Each logits row b reads one row s = slots[b] of per-request state (rows may share s):
* params [S, 4] float32: (mask_on, repetition_penalty, frequency_penalty, presence_penalty);
* bitmask [S, ceil(V / 32)] int32: bit i of word j allows token 32 * j + i (xgrammar's layout; words are signed);
* counts [S, V] int32: how often each token occurs in the completion so far; seen [S, V] bool: it is in the prompt.
Repetition first (a token seen in the prompt or the completion has a positive logit divided by the penalty and a
negative one multiplied by it), then frequency and presence subtracted (vLLM's semantics); where mask_on is not 0
the tokens the mask does not allow become -inf.  A state row with params (0, 1, 0, 0) leaves its logits as they
are.  Computed in float32, returned as a new tensor in the logits' dtype; no host sync, no data-dependent shapes.
"""
import torch


def allowed_tokens(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, W] int32 bitmask -> [R, V] bool: token v is allowed where bit v % 32 of word v // 32 is set."""
    ids = torch.arange(vocab_size, device=bitmask.device)
    words = bitmask[:, ids // 32]
    return ((words >> (ids % 32).to(words.dtype)) & 1) != 0  # arithmetic shift, so bit 31 of a negative word is 1


def process_logits_reference(logits: torch.Tensor, slots: torch.Tensor, params: torch.Tensor,
                             bitmask: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    """logits [B, V] with each row's penalties and mask applied (see the module doc)."""
    x = logits.float()
    mask_on, rep, freq, pres = (p[:, None] for p in params[slots].unbind(-1))
    count = counts[slots]
    present = count > 0
    hit = (seen[slots] | present) & (rep != 1)
    x = torch.where(hit, torch.where(x > 0, x / rep, x * rep), x)
    x = x - freq * count - pres * present
    x = torch.where((mask_on != 0) & ~allowed_tokens(bitmask[slots], x.shape[-1]), float("-inf"), x)
    return x.to(logits.dtype)
