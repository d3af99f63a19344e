"""``LogitsState``: what a step needs, per token slot, to change a request's logits before sampling.

Penalties, biases and structured outputs are per request, in the rows of its token slot (``StepInputs.out_slots``);
padding and prefill chunks that sample nothing read the neutral scratch row.  Per slot:
* ``params`` [S, 4] float32: (mask on, repetition penalty, frequency penalty, presence penalty); (0, 1, 0, 0) is
  neutral; ``bitmask`` [S, ceil(V / 32)] int32: the tokens a grammar allows next (``engine/grammar.py``);
* ``counts`` [S, V] int32: each token's count in the completion so far, updated by the step that samples it
  (``count``); ``seen`` [S, V] bool: the token is in the prompt (repetition penalty);
* ``bias_ids`` / ``bias`` / ``held`` [S, K]: ``logit_bias`` entries (token, bias), and stop tokens (bias 0,
  ``held``) that are -inf while the token drawn sits below ``min_len`` [S] (prompt + ``min_tokens``); padding
  entries are (0, 0, False).  Biases are added first, then ``nanovllm::process_logits`` (penalties, mask);
* ``logits`` [S, V] (the model's dtype): a split step's logits, from its forward half to its sample half.
The host (``engine/logits_slots.py``) fills a slot's rows when a request takes it and its bitmask row before each
step; the step adds its sampled tokens to ``counts``.  A pytree, so a compiled step takes it as an argument.
"""
from dataclasses import dataclass

import torch
import torch.utils._pytree as pytree

from nanovllm.kernels import ops
from nanovllm.sampling_params import MAX_BIASED_TOKENS

NEUTRAL = (0.0, 1.0, 0.0, 0.0)  # a ``params`` row that changes nothing


@dataclass
class LogitsState:
    params: torch.Tensor
    bitmask: torch.Tensor
    counts: torch.Tensor
    seen: torch.Tensor
    logits: torch.Tensor
    bias_ids: torch.Tensor
    bias: torch.Tensor
    held: torch.Tensor
    min_len: torch.Tensor

    @classmethod
    def allocate(cls, slots: int, vocab_size: int, device, dtype=torch.float32,
                 width: int = MAX_BIASED_TOKENS) -> "LogitsState":
        """``slots`` rows of ``vocab_size`` tokens; ``dtype``: the model's logits'; ``width``: bias entries a slot
        holds (``K``)."""
        params = torch.tensor(NEUTRAL, dtype=torch.float32).repeat(slots, 1).to(device)
        return cls(params, torch.full((slots, -(-vocab_size // 32)), -1, dtype=torch.int32, device=device),
                   torch.zeros(slots, vocab_size, dtype=torch.int32, device=device),
                   torch.zeros(slots, vocab_size, dtype=torch.bool, device=device),
                   torch.zeros(slots, vocab_size, dtype=dtype, device=device),
                   torch.zeros(slots, width, dtype=torch.int64, device=device),
                   torch.zeros(slots, width, dtype=torch.float32, device=device),
                   torch.zeros(slots, width, dtype=torch.bool, device=device),
                   torch.zeros(slots, dtype=torch.int64, device=device))

    def process(self, logits: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The logits [B, V] the sampler draws from: biases added (and stop tokens -inf where ``positions`` [B],
        the index of the token drawn, is below the slot's ``min_len``), penalties applied, disallowed tokens -inf.
        In float32, rounded once to the logits' dtype."""
        short = (positions < self.min_len[slots])[:, None]
        add = torch.where(self.held[slots] & short, float("-inf"), self.bias[slots])
        biased = logits.float().scatter_add(1, self.bias_ids[slots], add)
        return ops.process_logits(biased, slots, self.params, self.bitmask, self.counts, self.seen).to(logits.dtype)

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
                                                          self.logits, self.bias_ids, self.bias, self.held,
                                                          self.min_len))


pytree.register_dataclass(LogitsState)
