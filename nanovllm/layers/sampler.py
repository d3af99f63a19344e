"""Token sampling inside the graph: greedy, temperature, top-k, top-p and per-request seeds.

Randomness comes from a counter-based hash of (request seed, token index, vocabulary id), turned into Gumbel
noise: ``argmax(logits / T + gumbel)`` is an exact draw from ``softmax(logits / T)``.  There is no generator
state, so a seeded request draws the same tokens whatever shares its batch, eager and graph agree, and the
whole sampler is a pure function of tensors that compiles and replays inside a CUDA graph.

The hash is 32-bit (unsigned, wrapping mod 2**32).  Here it is written in int64 tensors that emulate uint32:
every product is ``(x * C) & 0xFFFFFFFF`` with ``C < 2**31`` (so ``x * C < 2**63``) and values stay
non-negative, so ``>>`` is a logical shift.  ``nanovllm/kernels/triton_sampler.py`` computes the same hash in
``tl.uint32`` and the same float32 uniforms, bit for bit.

On CUDA the plain path (``sample(..., filtered=False)``, every decode step) is the registered op
``nanovllm::gumbel_argmax``, one opaque node in the compiled step.  When it runs it picks the fused Triton kernel
(one read of the logits, no [B, V] temporaries) for CUDA tensors, or the torch reference below for any other
tensors or with ``NANOVLLM_SAMPLER=reference``.  On other devices ``sample`` calls the reference directly, so that
Inductor fuses it into the compiled step.  Kernel and reference draw the same tokens, except at
float-rounding-level near-ties of the final scores (a ``log`` may differ from another by an ulp).

Top-k / top-p need a full sort of the vocabulary, which costs more than the rest of a small model's decode
step; the plain path skips it and the runner calls ``sample(..., filtered=True)`` only for batches that need
it.  That path stays in torch, with the same noise.
"""
import os

import torch

_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xorshift-multiply, two rounds) on int64 tensors holding values in [0, 2**32).

    Both multipliers are below 2**31, so every product stays below 2**63; the mask wraps it to 32 bits."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B] 32-bit keys (int64 tensor) from int64 seeds (all 64 bits) and positions (their low 32 bits)."""
    seed_key = _mix32((seeds & _M32) ^ _mix32(((seeds >> 32) & _M32) ^ 0x5BD1E995))
    return _mix32(seed_key ^ _mix32((positions & _M32) ^ 0x165667B1))


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """32-bit integers -> float32 uniforms in [2**-24, 1 - 2**-24]: strictly inside (0, 1), so the noise is finite.

    The top 23 bits k are used, u = (k + 0.5) / 2**23, so that k + 0.5 is exact in float32; with 24 the top
    value rounded to 1.0, whose noise is +inf (about 1 row in 110 of a 150k vocabulary then drew a uniformly
    random token).  The Triton kernel builds the same floats exactly from the same bits."""
    return ((bits >> 9).float() + 0.5) * (1.0 / (1 << 23))


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] float32 Gumbel(0, 1) noise, a pure function of (seed, position, vocabulary id)."""
    vocab = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    # The vocabulary id enters by xor, not by a product: Inductor folds ``arange * constant`` into its index
    # arithmetic, where a reshaped vocabulary once gave a coefficient beyond int32 in Triton's codegen.
    bits = _mix32(row_keys(seeds, positions)[:, None] ^ vocab[None, :])
    uniform = uniform_from_bits(bits)
    return -torch.log(-torch.log(uniform))


def inverse_temperature(temperature: torch.Tensor) -> torch.Tensor:
    """1 / max(T, 1e-6) per row: the logits are multiplied by it (one rounding, as in the Triton kernel)."""
    return 1.0 / temperature.float().clamp(min=1e-6)


def gumbel_argmax_reference(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
                            positions: torch.Tensor) -> torch.Tensor:
    """Per row: argmax of ``logits * (1 / max(T, 1e-6)) + gumbel`` where T > 0, else argmax of the logits."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    scaled = logits * inverse_temperature(temperature)[:, None]
    drawn = (scaled + gumbel_noise(seeds, positions, logits.shape[-1])).argmax(dim=-1)
    return torch.where(temperature > 0, drawn, greedy)


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda and os.environ.get("NANOVLLM_SAMPLER", "auto") != "reference"


@torch.library.custom_op("nanovllm::gumbel_argmax", mutates_args=())
def _gumbel_argmax(logits: torch.Tensor, temperature: torch.Tensor, seeds: torch.Tensor,
                   positions: torch.Tensor) -> torch.Tensor:
    """logits [B, V] -> token ids [B] int64 (see ``gumbel_argmax_reference``); the kernel is chosen at run time."""
    if _use_triton(logits):
        from nanovllm.kernels.triton_sampler import gumbel_argmax_triton
        return gumbel_argmax_triton(logits, temperature, seeds, positions)
    return gumbel_argmax_reference(logits, temperature, seeds, positions)


@_gumbel_argmax.register_fake
def _(logits, temperature, seeds, positions):
    return torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)


def _apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    k = torch.where(top_k < 0, logits.shape[-1], top_k)[:, None]
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = (ranks >= k) | (mass_before >= top_p[:, None])
    drop[:, 0] = False  # the best token always survives
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def sample(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
           seeds: torch.Tensor, positions: torch.Tensor, filtered: bool = False) -> torch.Tensor:
    """logits [B, V] (any float dtype) -> token ids [B] int64: greedy where temperature == 0."""
    if not filtered:
        if logits.is_cuda:
            return torch.ops.nanovllm.gumbel_argmax(logits, temperature, seeds, positions)
        # Off CUDA the op would only run the reference eagerly inside the compiled step; inline, Inductor fuses it
        # (CPU, 8 x 49,152 logits: 2.2 ms compiled against 10.8 ms eager).
        return gumbel_argmax_reference(logits, temperature, seeds, positions)
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    scaled = _apply_top_k_top_p(logits * inverse_temperature(temperature)[:, None], top_k, top_p)
    drawn = (scaled + gumbel_noise(seeds, positions, logits.shape[-1])).argmax(dim=-1)
    return torch.where(temperature > 0, drawn, greedy)
