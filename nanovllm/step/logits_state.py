"""``LogitsState``: what a step needs, per token slot, to change a request's logits before sampling.

Penalties and structured outputs are per request; a request's state lives in the row of its token slot
(``StepInputs.out_slots``), so a step reads it by the index it writes tokens by; padding and prefill chunks that
sample nothing read the neutral scratch row.  Per slot:
* ``params`` [S, 4] float32: (mask on, repetition penalty, frequency penalty, presence penalty); (0, 1, 0, 0) is
  neutral;
* ``bitmask`` [S, ceil(V / 32)] int32: the tokens a grammar allows next (``engine/grammar.py``), read where the
  mask is on;
* ``counts`` [S, V] int32: each token's count in the completion so far, updated by the step that samples it
  (``count``); ``seen`` [S, V] bool: the token is in the prompt (repetition penalty);
* ``logits`` [S, V] (the model's dtype): a split step's logits, from its forward half to its sample half
  (``nanovllm.step.function.run_forward``; padding rows share the scratch row).
The host (``engine/logits_slots.py``) fills a slot's rows when a request takes it and its bitmask row before each
step; the step adds its sampled tokens to ``counts``.  A pytree, so a compiled step takes it as an argument.
"""
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree

from nanovllm.kernels import ops

NEUTRAL = (0.0, 1.0, 0.0, 0.0)  # a ``params`` row that changes nothing


@dataclass
class LogitsState:
    params: torch.Tensor
    bitmask: torch.Tensor
    counts: torch.Tensor
    seen: torch.Tensor
    logits: torch.Tensor

    @classmethod
    def allocate(cls, slots: int, vocab_size: int, device, dtype=torch.float32) -> "LogitsState":
        """``slots`` rows of ``vocab_size`` tokens; ``dtype``: the model's logits'."""
        params = torch.tensor(NEUTRAL, dtype=torch.float32).repeat(slots, 1).to(device)
        return cls(params, torch.full((slots, -(-vocab_size // 32)), -1, dtype=torch.int32, device=device),
                   torch.zeros(slots, vocab_size, dtype=torch.int32, device=device),
                   torch.zeros(slots, vocab_size, dtype=torch.bool, device=device),
                   torch.zeros(slots, vocab_size, dtype=dtype, device=device))

    def process(self, logits: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """The logits [B, V] the sampler draws from: penalties applied, disallowed tokens -inf."""
        return ops.process_logits(logits, slots, self.params, self.bitmask, self.counts, self.seen)

    def keep(self, logits: torch.Tensor, slots: torch.Tensor) -> None:
        """Keep a split step's logits [B, V] in ``logits``, row ``b`` in row ``slots[b]``, for its sample half."""
        self.logits.index_copy_(0, slots, logits)

    def count(self, slots: torch.Tensor, tokens: torch.Tensor, delta: int = 1) -> None:
        """Add ``delta`` to each row's sampled token's count in its slot (padding counts in the neutral scratch
        row)."""
        self.counts.index_put_((slots, tokens), torch.full_like(tokens, delta, dtype=self.counts.dtype),
                               accumulate=True)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.params, self.bitmask, self.counts, self.seen,
                                                          self.logits))


pytree.register_dataclass(LogitsState)
