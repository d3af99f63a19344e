"""The twin of ``nanovllm::lora_add``: the definition every kernel must match (``ops.py``)."""
import torch


def lora_add_reference(y: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       scaling: torch.Tensor) -> torch.Tensor:
    """``y`` [T, N] plus, for each token t whose slot s = ``slots[t]`` is not 0, ``((x[t] @ a[s].T) @ b[s].T) *
    scaling[s]`` in ``y``'s dtype, computed as PEFT computes a LoRA layer (shrink, expand, then scale, each rounded
    to the dtype).  ``x`` [T, K], ``a`` [S, R, K], ``b`` [S, N, R], ``scaling`` [S] float32.  One pass per slot over
    every token (static shapes, no host sync): the CPU path, not a fast one."""
    out = y.clone()
    for s in range(1, a.shape[0]):
        delta = (x @ a[s].T) @ b[s].T
        delta = delta * scaling[s].to(delta.dtype)
        out = torch.where((slots == s)[:, None], out + delta, out)
    return out
