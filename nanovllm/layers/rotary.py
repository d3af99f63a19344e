"""Rotary position embedding tables (rotate-half form; Llama-3, LongRoPE and YaRN scaling) held as module buffers.

The float32 ``cos_cache`` / ``sin_cache`` hold a row for every position up to ``max_position``; the model hands
them to ``ops.rope_store_kv`` with one table row per token (``table_rows``), which the op gathers inside the graph
(no data-dependent shapes).  The math is ``kernels/norm_rope.py``.

LongRoPE with long factors that can be reached keeps two tables, short-factor rows then long-factor rows, and picks
them per sequence and step, as transformers' ``generate`` does for one sequence (it picks by the largest position
in a forward pass): every token a sequence computes in a step whose context (``context_lens``) is longer than
``original_max_position_embeddings`` takes the long factors, the others the short ones.  Keys already in the KV
cache keep the rotation they were stored with, as in transformers' cache.  So a prompt longer than the boundary
prefilled in one step, and a sequence that decodes across it, match transformers.  Where transformers would see
the whole prompt in one pass but we do not (a prompt chunked by ``max_num_batched_tokens``, or a prefix-cache hit
on blocks another sequence computed), the chunks at or below the boundary keep the short factors.
"""
import torch
from torch import nn

from nanovllm.kernels.norm_rope import longrope_switch, rope_cos_sin


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float, scaling: dict | None = None):
        super().__init__()
        cos, sin = rope_cos_sin(head_dim, max_position, base, scaling)
        self.register_buffer("cos_cache", cos, persistent=False)
        self.register_buffer("sin_cache", sin, persistent=False)
        self.max_position = max_position
        self.long_after = longrope_switch(scaling, max_position)  # None: one table, rows are positions

    def table_rows(self, positions: torch.Tensor, context_lens: torch.Tensor,
                   cu_seqlens_q: torch.Tensor) -> torch.Tensor:
        """The cos/sin row of each token [T]: its position, moved to the long-factor rows when its sequence's
        context this step is longer than ``long_after`` (LongRoPE).  Static shapes, no host sync."""
        if self.long_after is None:
            return positions
        tokens = torch.arange(positions.shape[0], dtype=cu_seqlens_q.dtype, device=positions.device)
        seq = torch.searchsorted(cu_seqlens_q[1:], tokens, right=True).clamp(max=context_lens.shape[0] - 1)
        return torch.where(context_lens[seq] > self.long_after, positions + self.max_position, positions)
