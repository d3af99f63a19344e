"""RMSNorm and rotary position embedding (with Llama-3, YaRN and LongRoPE scaling) as pure torch functions, computed
the way transformers computes them.

float32 results equal transformers' bit for bit (the parity tests rely on it), so the rounding steps are those of
its code: RMSNorm's statistics in float32 with the normed value rounded to the input's dtype before the weight
scales it, and rope's float32 cos/sin rounded to q's dtype before they multiply.  ``layers/`` builds its modules on
these, the twins in ``reference.py`` call them, and ``triton_rope_store.py`` reproduces their rounding.
"""
import math

import torch


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: statistics in float32, the normed value rounded to x's dtype, then scaled."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rotary(positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor, cos_cache: torch.Tensor,
                 sin_cache: torch.Tensor):
    """q [T, Hq, D], k [T, Hkv, D] rotated by the float32 cos/sin rows of their positions (rounded to q's dtype)."""
    cos = cos_cache[positions].to(q.dtype)[:, None, :]
    sin = sin_cache[positions].to(q.dtype)[:, None, :]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama-3.x long-context scaling: slow down low frequencies, keep high ones, blend in between."""
    factor = scaling["factor"]
    low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def _frequency_exponents(head_dim: int) -> torch.Tensor:
    """The exponents 2i / head_dim of the rope base, one per rotated pair (float32, as transformers builds them)."""
    return torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim


def longrope_inv_freq(head_dim: int, base: float, scaling: dict, which: str) -> torch.Tensor:
    """LongRoPE: each inverse frequency divided by its own rescale factor from ``scaling[which]`` (``short_factor``
    or ``long_factor``)."""
    factors = scaling[which]
    if len(factors) != head_dim // 2:
        raise ValueError(f"rope_scaling {which} needs head_dim / 2 = {head_dim // 2} entries, got {len(factors)}")
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * base ** _frequency_exponents(head_dim))


def longrope_attention_factor(scaling: dict, max_position: int) -> float:
    """The factor cos and sin are multiplied by: ``attention_factor`` if given, else sqrt(1 + ln s / ln L) for
    L = ``original_max_position_embeddings`` and s = ``factor`` (default max_position / L), 1 when s <= 1."""
    if scaling.get("attention_factor") is not None:
        return float(scaling["attention_factor"])
    original = scaling.get("original_max_position_embeddings") or max_position
    factor = scaling.get("factor") or max_position / original
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def _yarn_mscale(factor: float, weight: float = 1.0) -> float:
    """YaRN's magnitude correction 0.1 * weight * ln(factor) + 1 for factor > 1, else 1."""
    return 1.0 if factor <= 1 else 0.1 * weight * math.log(factor) + 1.0


def yarn_inv_freq(head_dim: int, base: float, scaling: dict, max_position: int) -> tuple[torch.Tensor, float]:
    """YaRN ("NTK-by-parts"): (inverse frequencies, the factor cos and sin are multiplied by).

    ``head_dim`` is the rotated width (a partial rope passes its part).  With L = ``original_max_position_embeddings``
    (default ``max_position``) and s = ``factor`` (default ``max_position`` / L), pair i of the rotation keeps its
    frequency where it turns more than ``beta_fast`` (32) times over L, is divided by s where it turns fewer than
    ``beta_slow`` (1) times, and blends the two linearly in between.  The boundaries are the pair indices d(b) =
    head_dim * ln(L / (2 pi b)) / (2 ln base), floored / ceiled unless ``truncate`` is false (GPT-OSS), then clamped
    to [0, head_dim - 1].  The attention factor is ``attention_factor`` if set, else mscale(s, ``mscale``) /
    mscale(s, ``mscale_all_dim``) when both are set (DeepSeek-style), else mscale(s) = 0.1 ln s + 1.  float32 steps
    in transformers' order, so the tables equal its ``_compute_yarn_parameters`` bit for bit."""
    original = scaling.get("original_max_position_embeddings") or max_position
    factor = scaling.get("factor")
    if factor is None:
        factor = max_position / original
    attention = scaling.get("attention_factor")
    if attention is None:
        weight, weight_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        if weight and weight_all:
            attention = _yarn_mscale(factor, weight) / _yarn_mscale(factor, weight_all)
        else:
            attention = _yarn_mscale(factor)

    def pair_turning(rotations: float) -> float:  # the (fractional) pair index that turns `rotations` times over L
        return (head_dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    fast, slow = pair_turning(scaling.get("beta_fast") or 32), pair_turning(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        fast, slow = math.floor(fast), math.ceil(slow)
    fast, slow = max(fast, 0), min(slow, head_dim - 1)
    if fast == slow:
        slow += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - fast) / (slow - fast)).clamp(0, 1)
    keep = 1 - ramp  # the weight of the unscaled frequency: 1 for fast pairs, 0 for slow ones
    powers = base ** _frequency_exponents(head_dim)  # base^(2i / head_dim), 1 / the unscaled frequency
    scaled, unscaled = 1.0 / (factor * powers), 1.0 / powers
    return scaled * (1 - keep) + unscaled * keep, float(attention)


def longrope_switch(scaling: dict | None, max_position: int) -> int | None:
    """For LongRoPE whose long factors can be reached and differ from the short ones: the context length past which
    a sequence's tokens take the long factors (``original_max_position_embeddings``).  None otherwise, so that a
    checkpoint like MiniCPM4-0.5B (equal factors, original == max_position_embeddings) gets one plain table."""
    if _rope_type(scaling) != "longrope":
        return None
    original = scaling.get("original_max_position_embeddings") or max_position
    if max_position <= original or list(scaling["long_factor"]) == list(scaling["short_factor"]):
        return None
    return original


def _rope_type(scaling: dict | None) -> str | None:
    return (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))


def _cos_sin(inv_freq: torch.Tensor, max_position: int, attention_factor: float = 1.0):
    positions = torch.arange(max_position, dtype=torch.int64).float()
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    if attention_factor == 1.0:
        return emb.cos(), emb.sin()
    return emb.cos() * attention_factor, emb.sin() * attention_factor


def rope_cos_sin(head_dim: int, max_position: int, base: float, scaling: dict | None = None):
    """float32 (cos, sin) tables [max_position, head_dim] of the rotate-half rope, scaled as ``scaling`` asks
    (``linear``, ``llama3``, ``yarn``, ``longrope``; another type raises NotImplementedError naming it).  LongRoPE uses the
    short factors; where ``longrope_switch`` is not None the tables are [2 * max_position, head_dim]: the
    short-factor rows, then the long-factor rows."""
    rope_type = _rope_type(scaling)
    if rope_type == "longrope":
        missing = [k for k in ("short_factor", "long_factor") if k not in scaling]
        if missing:
            raise ValueError(f"rope_scaling {scaling!r} of type 'longrope' lacks {missing}")
        factor = longrope_attention_factor(scaling, max_position)
        short = _cos_sin(longrope_inv_freq(head_dim, base, scaling, "short_factor"), max_position, factor)
        if longrope_switch(scaling, max_position) is None:
            return short
        long = _cos_sin(longrope_inv_freq(head_dim, base, scaling, "long_factor"), max_position, factor)
        return torch.cat((short[0], long[0])), torch.cat((short[1], long[1]))
    if rope_type == "yarn":
        inv_freq, attention_factor = yarn_inv_freq(head_dim, base, scaling, max_position)
        return _cos_sin(inv_freq, max_position, attention_factor)
    inv_freq = 1.0 / (base ** _frequency_exponents(head_dim))
    if rope_type == "llama3":
        inv_freq = llama3_inv_freq(inv_freq, scaling)
    elif rope_type == "linear":  # positions divided by the factor (Gemma 3's global layers)
        inv_freq = inv_freq / scaling["factor"]
    elif rope_type not in ("default", None):
        raise NotImplementedError(f"rope_scaling type {rope_type!r} is not supported "
                                  f"(supported: default, linear, llama3, longrope, yarn)")
    return _cos_sin(inv_freq, max_position)
