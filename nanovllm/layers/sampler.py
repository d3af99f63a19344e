"""Token sampling inside the graph: greedy, temperature, top-k, top-p and per-request seeds.

Randomness comes from a counter-based hash of (request seed, token index, vocabulary id), turned into Gumbel
noise: ``argmax(logits / T + gumbel)`` is an exact draw from ``softmax(logits / T)``.  There is no generator
state, so a seeded request draws the same tokens whatever shares its batch, eager and graph agree, and the
whole sampler is a pure function of tensors that compiles and replays inside a CUDA graph.

Top-k / top-p need a full sort of the vocabulary, which costs more than the rest of a small model's decode
step; the plain path skips it and the runner calls ``sample(..., filtered=True)`` only for batches that need it.
"""
import torch

_MASK31 = 0x7FFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 31-bit integer finaliser; every product stays below 2**62, so int64 never overflows."""
    x = ((x ^ (x >> 15)) * 0x2C1B3C6D) & _MASK31
    x = ((x ^ (x >> 12)) * 0x297A2D39) & _MASK31
    return x ^ (x >> 15)


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """31-bit integers -> float32 uniforms in [2**-24, 1 - 2**-24]: strictly inside (0, 1), so the noise is finite.

    23 bits are used so that k + 0.5 is exact in float32; with 24 the top value rounded to 1.0, whose noise is
    +inf (about 1 row in 110 of a 150k vocabulary then drew a uniformly random token)."""
    return ((bits >> 8).float() + 0.5) * (1.0 / (1 << 23))


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] float32 Gumbel(0, 1) noise, a pure function of (seed, position, vocabulary id)."""
    seed_key = _mix(seeds & _MASK31) ^ _mix(((seeds >> 31) & _MASK31) + 0x5BD1E995)
    row_key = _mix(seed_key ^ (positions & _MASK31))
    vocab = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    # The vocabulary id enters by xor, not by a product: Inductor folds ``arange * constant`` into its index
    # arithmetic, where a reshaped vocabulary once gave a coefficient beyond int32 in Triton's codegen.
    bits = _mix(_mix(row_key[:, None] ^ vocab[None, :]) + 0x165667B1) & _MASK31
    uniform = uniform_from_bits(bits)
    return -torch.log(-torch.log(uniform))


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
    """logits [B, V] (any float dtype) -> token ids [B] int64."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    scaled = logits / temperature.clamp(min=1e-6)[:, None]
    if filtered:
        scaled = _apply_top_k_top_p(scaled, top_k, top_p)
    drawn = (scaled + gumbel_noise(seeds, positions, logits.shape[-1])).argmax(dim=-1)
    return torch.where(temperature > 0, drawn, greedy)
