"""Pure-PyTorch twin of ``nanovllm::fused_moe`` (the CPU path and the oracle of the Triton kernels), and the
reference of the expert-sorted, block-aligned layout the Triton grouped GEMMs read.

``fused_moe(x [T, H], router_logits [T, E], w13 [E, 2I, H], w2 [E, H, I], top_k, renormalize) -> [T, H]``:
* Routing: float32 softmax of the logits, the ``top_k`` largest, divided by their sum with ``renormalize``; float32
  until they weight an expert, or with ``round_weights`` (Qwen MoE families, as their transformers routers) each
  weight and each weighted output ``y_e * w_e`` rounded to x's dtype before the sum (a no-op in float32 and W8A8).
* Expert ``e``: ``w2[e] @ act(gate, up) + w2_bias[e]``, ``[gate; up] = w13[e] @ x + w13_bias[e]`` (FP8, int4 or
  MXFP4 experts dequantized to x's dtype first; ``act``: SiLU-and-multiply, GPT-OSS's clamped SwiGLU or GELU); the
  router-weighted sum of its ``top_k`` ones, summed in float32, in x's dtype.  W8A8 FP8 experts (``act_quant``):
  x and the activation's output rounded as ``act_quant`` says, both products in float32, a chunk of pairs at a time.
Layout (``align_reference``; ``triton_moe_align.py`` on the GPU): pair ``p = token * top_k + k`` goes to expert
``ids[p]``; pairs are grouped by expert, in pair order inside one, each group starting at a multiple of ``block_m``
and padded up to one, in ``num_aligned_blocks`` blocks whatever the routing (static sizes).
"""
import torch
import torch.nn.functional as F

from nanovllm.kernels import act_quant, int4_quant, mxfp4_quant, weight_quant

_CHUNK_ELEMENTS = 1 << 24  # gathered expert weight elements held at once, about (at least one pair's)
ACTIVATIONS = ("silu", "swiglu_oss", "gelu_tanh")


def activate(gate: torch.Tensor, up: torch.Tensor, activation: str = "silu", alpha: float = 1.702,
             limit: float = 7.0) -> torch.Tensor:
    """The gated halves' product (``activation`` one of ``ACTIVATIONS``): "silu" ``silu(gate) * up``; "gelu_tanh"
    (Gemma 4) ``gelu_tanh(gate) * up``; "swiglu_oss"
    (GPT-OSS; transformers' ``GptOssExperts._apply_gate``, in its order of operations) ``(u + 1) * g * sigmoid(alpha
    * g)`` with ``g = min(gate, limit)`` and ``u = clamp(up, -limit, limit)``."""
    if activation == "silu":
        return F.silu(gate) * up
    if activation == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    if activation == "swiglu_oss":
        gate = gate.clamp(max=limit)
        up = up.clamp(min=-limit, max=limit)
        return (up + 1) * (gate * torch.sigmoid(gate * alpha))
    raise ValueError(f"MoE activation {activation!r}: expected one of {', '.join(ACTIVATIONS)}")


def route_reference(router_logits: torch.Tensor, top_k: int, renormalize: bool):
    """(weights float32 [T, top_k], expert ids int64 [T, top_k]), the most probable expert first."""
    probs = torch.softmax(router_logits.float(), dim=-1)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def experts_reference(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w13: torch.Tensor,
                      w2: torch.Tensor, w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None,
                      group: int = 0, w13_zero: torch.Tensor | None = None,
                      w2_zero: torch.Tensor | None = None, w13_bias: torch.Tensor | None = None,
                      w2_bias: torch.Tensor | None = None, activation: str = "silu", swiglu_alpha: float = 1.702,
                      swiglu_limit: float = 7.0, round_weights: bool = False) -> torch.Tensor:
    """The weighted sum over each token's chosen experts (``weights``/``ids`` [T, top_k]) -> [T, H] in x's dtype.
    FP8 experts (with scales), int4 ones (with scales and zeros) and MXFP4 ones (uint8 with uint8 scales) are
    dequantized into x's dtype, a chunk of pairs at a time; biases, ``activation`` (``activate``) and
    ``round_weights`` as the module docstring says."""
    num_tokens, top_k = ids.shape
    hidden = x.shape[1]
    if num_tokens == 0:
        return torch.zeros_like(x)
    num_pairs = num_tokens * top_k
    columns = 2 if w13.dtype == torch.uint8 else 1  # an int4 or MXFP4 byte holds two
    per_pair = (w13.shape[1] * w13.shape[2] + w2.shape[1] * w2.shape[2]) * columns
    chunk = max(1, _CHUNK_ELEMENTS // per_pair)
    flat_ids = ids.reshape(-1)
    token_of = torch.arange(num_tokens, device=x.device).repeat_interleave(top_k)
    w8a8 = act_quant.moe_w8a8(w13, w13_scale, w13_zero, group)
    dtype = torch.float32 if w8a8 else x.dtype  # W8A8: e4m3 products summed in float32
    x_in = act_quant.dequantized(x) if w8a8 else x
    outs = []
    for p0 in range(0, num_pairs, chunk):
        e = flat_ids[p0:p0 + chunk]
        xs = x_in.index_select(0, token_of[p0:p0 + chunk])
        w13_e = _gather(w13, w13_scale, w13_zero, group, e, dtype)
        gate_up = torch.bmm(w13_e, xs[:, :, None])[:, :, 0]  # [c, 2I]
        if w13_bias is not None:
            gate_up = gate_up + w13_bias.index_select(0, e).to(dtype)
        gate, up = gate_up.chunk(2, dim=-1)
        h = activate(gate, up, activation, swiglu_alpha, swiglu_limit)
        down = _gather(w2, w2_scale, w2_zero, group, e, dtype)
        y = torch.bmm(down, (act_quant.dequantized(h) if w8a8 else h)[:, :, None])[:, :, 0]  # [c, H]
        outs.append(y if w2_bias is None else y + w2_bias.index_select(0, e).to(dtype))
    y = outs[0] if len(outs) == 1 else torch.cat(outs)
    if round_weights and not w8a8:  # weight and product rounded to x's dtype (y's)
        y = (y * weights.reshape(-1, 1).to(y.dtype)).float()
    else:
        y = y.float() * weights.reshape(-1, 1)
    return y.view(num_tokens, top_k, hidden).sum(dim=1).to(x.dtype)


def _gather(w: torch.Tensor, scale: torch.Tensor | None, zero: torch.Tensor | None, group: int, e: torch.Tensor,
            dtype: torch.dtype):
    """Experts ``e`` of stacked ``w``, dequantized into ``dtype`` where they are FP8, int4 (with ``zero``) or
    MXFP4."""
    if scale is None:
        return w.index_select(0, e)
    if mxfp4_quant.is_mxfp4(w, scale, zero):
        return mxfp4_quant.dequantize(w.index_select(0, e), scale.index_select(0, e), dtype)
    if zero is not None:
        return int4_quant.dequantize(w.index_select(0, e), scale.index_select(0, e), zero.index_select(0, e), group,
                                     dtype)
    return weight_quant.dequantize(w.index_select(0, e), scale.index_select(0, e), group, dtype)


def fused_moe_reference(x: torch.Tensor, router_logits: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                        top_k: int, renormalize: bool, w13_scale: torch.Tensor | None = None,
                        w2_scale: torch.Tensor | None = None, group: int = 0, w13_zero: torch.Tensor | None = None,
                        w2_zero: torch.Tensor | None = None, w13_bias: torch.Tensor | None = None,
                        w2_bias: torch.Tensor | None = None, activation: str = "silu", swiglu_alpha: float = 1.702,
                        swiglu_limit: float = 7.0, round_weights: bool = False) -> torch.Tensor:
    """The twin of ``nanovllm::fused_moe`` (see the module docstring)."""
    weights, ids = route_reference(router_logits, top_k, renormalize)
    return experts_reference(x, weights, ids, w13, w2, w13_scale, w2_scale, group, w13_zero, w2_zero, w13_bias,
                             w2_bias, activation, swiglu_alpha, swiglu_limit, round_weights)


def num_aligned_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Blocks of ``block_m`` slots that hold every expert's pairs, each group padded to whole blocks, whatever
    the routing: each expert that gets a pair (at most ``min(E, P)`` of them) wastes under one block."""
    return -(-(num_pairs + min(num_experts, num_pairs) * (block_m - 1)) // block_m)


def align_reference(ids: torch.Tensor, num_experts: int, block_m: int):
    """The grouped layout of expert ids [T, top_k] (module docstring): (sorted_ids int32 [num_blocks * block_m]
    with -1 in padding slots, block_expert int32 [num_blocks], block_rows int32 [num_blocks]).  Static shapes.

    Example, ``E = 3``, ``block_m = 4``, ids ``[2, 0, 2, 2, 0, 2]``: expert 0 holds pairs 1, 4 (one block), expert 1
    none, expert 2 pairs 0, 2, 3, 5 (one block)::

        sorted_ids   = [1, 4, -1, -1, 0, 2, 3, 5, ...]  the Triton kernels leave padding slots unwritten (never read)
        block_expert = [0, 2, 0, ...]                   blocks past the last expert's: rows 0, the GEMMs skip them
        block_rows   = [2, 4, 0, ...]
    """
    flat = ids.reshape(-1).long()
    num_pairs = flat.shape[0]
    num_blocks = num_aligned_blocks(num_pairs, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(0, flat,
                                                                                        torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    end = padded.cumsum(0)
    start = end - padded
    order = torch.sort(flat, stable=True).indices  # pairs grouped by expert, in pair order inside one
    first_of_expert = counts.cumsum(0) - counts
    rank = torch.arange(num_pairs, device=ids.device) - first_of_expert[flat[order]]
    slots = torch.full((num_blocks * block_m,), -1, dtype=torch.int64, device=ids.device)
    slots.index_copy_(0, start[flat[order]] + rank, order)
    row0 = torch.arange(num_blocks, device=ids.device) * block_m
    expert = torch.searchsorted(end, row0, right=True)  # the first expert whose group ends past row0
    in_range = expert < num_experts
    expert = expert.clamp(max=num_experts - 1)
    rows = torch.where(in_range, (start[expert] + counts[expert] - row0).clamp(0, block_m), 0)
    return slots.to(torch.int32), torch.where(in_range, expert, 0).to(torch.int32), rows.to(torch.int32)
