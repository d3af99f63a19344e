"""Token sampling math in pure torch: the counter-based Gumbel noise, the twin of ``nanovllm::gumbel_argmax`` and
the min-p / top-k / top-p filter.

Randomness comes from a counter-based hash of (request seed, token index, vocabulary id), turned into Gumbel
noise: ``argmax(logits / T + gumbel)`` is an exact draw from ``softmax(logits / T)``.  There is no generator
state, so a seeded request draws the same tokens whatever shares its batch, eager and graph agree, and sampling
is a pure function of tensors with static shapes (no host synchronisation).

The hash is 32-bit (unsigned, wrapping mod 2**32).  Here it is written in int64 tensors that emulate uint32:
every product is ``(x * C) & 0xFFFFFFFF`` with ``C < 2**31`` (so ``x * C < 2**63``) and values stay
non-negative, so ``>>`` is a logical shift.  ``triton_sampler.py`` computes the same hash in ``tl.uint32`` and
the same float32 uniforms, bit for bit; its tokens equal ``gumbel_argmax_reference``'s except at float-rounding
near-ties of the final scores (a ``log`` may differ from another by an ulp).
"""
import torch

_M32 = 0xFFFFFFFF


def mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xorshift-multiply, two rounds) on int64 tensors holding values in [0, 2**32).

    Both multipliers are below 2**31, so every product stays below 2**63; the mask wraps it to 32 bits."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


def row_keys(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """[B] 32-bit keys (int64 tensor) from int64 seeds (all 64 bits) and positions (their low 32 bits)."""
    seed_key = mix32((seeds & _M32) ^ mix32(((seeds >> 32) & _M32) ^ 0x5BD1E995))
    return mix32(seed_key ^ mix32((positions & _M32) ^ 0x165667B1))


def uniform_from_bits(bits: torch.Tensor) -> torch.Tensor:
    """32-bit integers -> float32 uniforms in [2**-24, 1 - 2**-24]: strictly inside (0, 1), so the noise is finite.

    The top 23 bits k are used, u = (k + 0.5) / 2**23, so that k + 0.5 is exact in float32 (with 24 bits the top
    value would round to 1.0, whose noise is +inf).  The Triton kernel builds the same floats from the same bits."""
    return ((bits >> 9).float() + 0.5) * (1.0 / (1 << 23))


def gumbel_noise(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] float32 Gumbel(0, 1) noise, a pure function of (seed, position, vocabulary id)."""
    vocab = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    # The vocabulary id enters by xor, not by a product: Inductor folds ``arange * constant`` into its index
    # arithmetic, where a reshaped vocabulary can give a coefficient beyond int32 in Triton's codegen.
    bits = mix32(row_keys(seeds, positions)[:, None] ^ vocab[None, :])
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


def apply_top_k_top_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """logits [B, V] with every token outside each row's top-k (``top_k < 0``: all) and outside its top-p nucleus
    set to -inf.  Needs a full sort of the vocabulary."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    ranks = torch.arange(logits.shape[-1], device=logits.device)[None, :]
    k = torch.where(top_k < 0, logits.shape[-1], top_k)[:, None]
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = ((ranks >= k) | (mass_before >= top_p[:, None])) & (ranks > 0)  # the best token always survives
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """logits [B, V] (already divided by the temperature) with every token whose probability is below its row's
    ``min_p`` times the row's largest probability set to -inf (``min_p`` 0: nothing dropped)."""
    probs = logits.softmax(dim=-1)
    floor = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < floor, float("-inf"))


def filtered_gumbel_argmax(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                           top_p: torch.Tensor, seeds: torch.Tensor, positions: torch.Tensor,
                           min_p: torch.Tensor | None = None) -> torch.Tensor:
    """``gumbel_argmax_reference`` over the logits that survive ``apply_min_p`` (when ``min_p`` is given) and then
    ``apply_top_k_top_p`` (on what min-p kept, renormalised), with the same noise."""
    logits = logits.float()
    greedy = logits.argmax(dim=-1)
    scaled = logits * inverse_temperature(temperature)[:, None]
    if min_p is not None:
        scaled = apply_min_p(scaled, min_p.float())
    scaled = apply_top_k_top_p(scaled, top_k, top_p)
    drawn = (scaled + gumbel_noise(seeds, positions, logits.shape[-1])).argmax(dim=-1)
    return torch.where(temperature > 0, drawn, greedy)
