"""The twins of ``nanovllm::lora_add`` and ``nanovllm::lora_linear`` (and of the expand alone, ``lora_linear``'s
second half): the definitions every kernel must match (``ops.py``)."""
import torch


def lora_add_reference(y: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       scaling: torch.Tensor) -> torch.Tensor:
    """``y`` [T, N] plus, for each token t whose slot s = ``slots[t]`` is not 0, ``((x[t] @ a[s].T) @ b[s].T) *
    scaling[s]`` in ``y``'s dtype, computed as PEFT computes a LoRA layer (shrink, expand, then scale, each rounded
    to the dtype).  ``x`` [T, K], ``a`` [S, R, K], ``b`` [S, N, R], ``scaling`` [S] float32.  One pass per slot over
    every token (static shapes, no host sync): the CPU path, not a fast one."""
    return _add_per_slot(y, slots, b, scaling, lambda s: x @ a[s].T)


def lora_expand_reference(y: torch.Tensor, h: torch.Tensor, slots: torch.Tensor, b: torch.Tensor,
                          scaling: torch.Tensor) -> torch.Tensor:
    """``lora_add_reference`` with the shrink already done: ``h`` [T, S*R] holds every slot's ``x @ a[s].T`` side
    by side (slot s in columns s*R..), as one product with the slots' A stacked gives it (``lora/pool.py`` stacks
    them under the base weight); each token adds its own slot's ``(h[t, s*R:(s+1)*R] @ b[s].T) * scaling[s]``."""
    r = b.shape[2]
    return _add_per_slot(y, slots, b, scaling, lambda s: h[:, s * r:(s + 1) * r])


def lora_linear_reference(x: torch.Tensor, fold: torch.Tensor, bias: torch.Tensor | None, slots: torch.Tensor,
                          b: torch.Tensor, scaling: torch.Tensor, n: int, a_row: int) -> torch.Tensor:
    """``x @ fold[:n].T + bias`` plus ``lora_add_reference``'s products with A = ``fold[a_row:]`` viewed [S, R, K]
    (the pool stacks it under the weight, ``lora/pool.py``): one product by ``fold`` makes the base outputs and
    every slot's shrink, and ``lora_expand_reference`` adds the rest."""
    z = x @ fold.T
    y = z[:, :n] if bias is None else z[:, :n] + bias
    return lora_expand_reference(y, z[:, a_row:], slots, b, scaling)


def _add_per_slot(y, slots, b, scaling, shrink) -> torch.Tensor:
    """``y`` plus, in the rows of each slot s past 0, ``(shrink(s) @ b[s].T) * scaling[s]`` in the dtype."""
    out = y.clone()
    for s in range(1, b.shape[0]):
        delta = shrink(s) @ b[s].T
        delta = delta * scaling[s].to(delta.dtype)
        out = torch.where((slots == s)[:, None], out + delta, out)
    return out
