"""Rotary position embedding tables (rotate-half form, with Llama-3 frequency scaling) held as module buffers.

The float32 ``cos_cache`` / ``sin_cache`` [max_position, head_dim] hold every position up to ``max_position``; the
model hands them to ``ops.rope_store_kv``, which gathers rows by position inside the graph (no data-dependent
shapes).  The math is ``kernels/norm_rope.py``.
"""
from torch import nn

from nanovllm.kernels.norm_rope import rope_cos_sin


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_position: int, base: float, scaling: dict | None = None):
        super().__init__()
        cos, sin = rope_cos_sin(head_dim, max_position, base, scaling)
        self.register_buffer("cos_cache", cos, persistent=False)
        self.register_buffer("sin_cache", sin, persistent=False)
