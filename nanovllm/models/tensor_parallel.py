"""How the shared decoder's tensors split over the tensor-parallel group (``distributed.current()``), as vLLM
splits them:

* attention heads: each rank takes ``num_heads / N`` query heads and ``num_kv_heads / N`` KV heads; with fewer KV
  heads than ranks each KV head is replicated, rank r using head ``r * num_kv_heads // N``;
* column-parallel (outputs split, no collective): the packed qkv and gate/up projections (each part split on its
  own), attention sinks (GPT-OSS: one per query head), the experts' gate/up, and the LM head (vocabulary rows,
  padded to a multiple of N; the logits are gathered back in rank order and the padding cut);
* row-parallel (inputs split, then one all-reduce): attention's output projection and the MLP's (or the experts')
  down projection; a bias is added once, after the sum;
* replicated: embeddings, norms, routers;
* a hybrid model's linear-attention layers split by key and value heads (``LINEAR_ATTENTION_SPLIT``).

``matmul`` runs one projection by its weight's format.  ``checkpoint_slice`` says which piece of a checkpoint
tensor a rank's parameter holds, from the parameter's local shape, so the loader copies only that piece.
"""
import torch

import nanovllm.distributed as distributed
from nanovllm.distributed import fused_norm
from nanovllm.kernels import reference
from nanovllm.kernels.lora import ops as lora_ops
from nanovllm.layers.norm import RMSNorm, ZeroCenteredRMSNorm
from nanovllm.quant import held


# a Gated DeltaNet layer's tensors whose rows split by head like a column-parallel projection's (``models/hybrid.py``;
# its concatenated q/k/v projection and convolution are loaded whole and cut by the model, in three pieces)
LINEAR_ATTENTION_SPLIT = ("in_proj_qkvz", "in_proj_ba", "in_proj_z", "in_proj_b", "in_proj_a", "A_log", "dt_bias")


def split(total: int, what: str) -> int:
    """``total`` over the group's ranks; an error naming ``what`` where it does not divide."""
    size = distributed.current().size
    if total % size:
        raise ValueError(f"tensor_parallel_size={size} does not divide {what}={total}")
    return total // size


def kv_heads(num_kv_heads: int) -> tuple[int, int]:
    """(KV heads per rank, this rank's first KV head)."""
    tp = distributed.current()
    if num_kv_heads >= tp.size:
        local = split(num_kv_heads, "num_key_value_heads")
        return local, tp.rank * local
    if tp.size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size={tp.size} is not a multiple of num_key_value_heads={num_kv_heads}, "
                         f"so its KV heads cannot be replicated evenly")
    return 1, tp.rank * num_kv_heads // tp.size


def vocab_rows(vocab_size: int) -> int:
    """LM head rows per rank (the vocabulary padded to a multiple of the group size)."""
    size = distributed.current().size
    return -(-vocab_size // size)


def first_rank() -> bool:
    return distributed.current().rank == 0


def matmul(linear: torch.nn.Linear, x: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool = False,
           lora_slots: torch.Tensor | None = None):
    """``x @ linear.weight.T + bias`` by the op of the format the weight is held in (``quant/held.py``), plus each
    token's LoRA adapter's product (before the SiLU-and-multiply) where the projection holds a pool (``lora_a``,
    ``lora_b``, ``lora_scaling``: ``lora/pool.py``) and ``lora_slots`` names each token's slot; with one op where the
    pool's A is stacked under plain weights (``lora_fold``: its views are taken in the op, so no two inputs of a
    compiled region alias)."""
    a = getattr(linear, "lora_a", None)
    if a is None or lora_slots is None:
        return held.linear(linear, x, bias, silu_mul)
    fold = getattr(linear, "lora_fold", None)
    if fold is None:
        y = lora_ops.lora_add(held.linear(linear, x, bias, False), x, lora_slots, a, linear.lora_b,
                              linear.lora_scaling)
    else:
        y = lora_ops.lora_linear(x, fold, bias, lora_slots, linear.lora_b, linear.lora_scaling,
                                 *linear.lora_fold_rows)
    return reference.silu_and_mul(y) if silu_mul else y


def row_parallel(linear: torch.nn.Linear, x: torch.Tensor, lora_slots: torch.Tensor | None = None) -> torch.Tensor:
    """``linear(x)`` of a row-parallel projection: this rank's partial product (its LoRA product from its slice of
    the input too, ``matmul``), summed over the group."""
    if distributed.current().size == 1:
        return matmul(linear, x, linear.bias, lora_slots=lora_slots)
    y = distributed.all_reduce(matmul(linear, x, None, lora_slots=lora_slots))
    return y if linear.bias is None else y + linear.bias


def row_parallel_add_norm(linear: torch.nn.Linear, x: torch.Tensor, residual: torch.Tensor, norm: torch.nn.Module,
                          lora_slots: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(residual + row_parallel(linear, x), norm of it)``: the sum, the add and the norm in one launch where
    ``sum_add_norm`` fuses them (no bias)."""
    if distributed.current().size > 1 and linear.bias is None:
        return sum_add_norm(matmul(linear, x, None, lora_slots=lora_slots), residual, norm)
    residual = residual + row_parallel(linear, x, lora_slots)
    return residual, norm(residual)


_FUSED_NORMS = (RMSNorm, ZeroCenteredRMSNorm)  # the norms fused_norm computes, each by its own rounding


def sum_add_norm(y: torch.Tensor, residual: torch.Tensor, norm: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """``(residual + sum of this rank's partial y over the group, norm of it)``, in one launch where
    ``distributed.fused_norm`` takes it (an ``RMSNorm`` or ``ZeroCenteredRMSNorm``, 16-bit rows on CUDA)."""
    kind = type(norm)
    if kind in _FUSED_NORMS and distributed.current().size > 1 and fused_norm.usable(y, residual, norm.weight):
        return fused_norm.all_reduce_add_rms_norm(y, residual, norm.weight, norm.eps, kind is ZeroCenteredRMSNorm)
    residual = residual + distributed.all_reduce(y)
    return residual, norm(residual)


def gather_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Every rank's vocabulary rows of the logits, in order, without the padding."""
    if distributed.current().size == 1:
        return logits
    return distributed.all_gather_last_dim(logits)[..., :vocab_size]


def checkpoint_slice(target: str, part, local_shape: tuple, args) -> tuple[int, int, int] | None:
    """(dim, start, length) of the checkpoint tensor that fills this rank's piece of parameter ``target`` (``part``
    as the loader's ``_target`` gives it, ``local_shape`` the piece's shape in the checkpoint tensor's layout), or
    None where the rank holds all of it."""
    tp = distributed.current()
    if tp.size == 1:
        return None
    names = target.split(".")
    if any(n in names for n in ("o_proj", "down_proj", "out_proj")) and not target.endswith(".bias"):  # row-parallel
        length = local_shape[-1]
        return len(local_shape) - 1, tp.rank * length, length
    if not any(n in names for n in ("qkv_proj", "gate_up_proj", "lm_head", "sinks") + LINEAR_ATTENTION_SPLIT):
        return None
    length = local_shape[0]
    if "qkv_proj" in names and part in (1, 2):
        _, first = kv_heads(args.num_kv_heads)
        return 0, first * args.head_dim, length
    return 0, tp.rank * length, length
