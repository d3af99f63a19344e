"""Low-rank (SVD) experts: a compressed checkpoint's MoE layers, and how a model class is adapted to load one.

A checkpoint is compressed when its config.json holds ``expert_compression`` (written by ``tools/compress_experts.py``):
``{"method", "rank", "ridge", "ranks": {"gate": Rg, "up": Ru, "down": Rd}}``.  Per layer, each expert matrix has one
basis shared by the layer's experts and one small matrix per expert, ``W_e ≈ U · V_e`` (``SvdExperts``:
``gate_U [I, Rg]``, ``gate_V [E, Rg, H]``, likewise ``up``; ``down_U [H, Rd]``, ``down_V [E, Rd, I]``).

``SvdMoe`` routes as ``SparseMoe`` (``moe_reference.route_reference``) and computes, per (token, k) pair,
``h = silu(U_g V_g,e x) * (U_u V_u,e x)`` (the bases expand before the SiLU: it is not linear) and
``z = V_d,e h``; the router-weighted sum of ``z`` over a token's pairs is taken in the rank space, and ``U_d``,
shared and linear, is applied once per token after it.  Every shape depends only on the step's token count, so the
layer traces (prefill with dynamic shapes included) and replays in a graph (``svd_experts_forward``).

``compressed_class(cls, compression)`` is ``cls`` with its sparse MLPs built as ``SvdMoe`` (the full experts never
allocated); ``loader.build_model`` uses it for a compressed checkpoint.
"""
import torch
import torch.nn.functional as F
from torch import nn

from nanovllm.kernels import ops
from nanovllm.kernels.moe_reference import route_reference
from nanovllm.models.moe import SparseMoe



class SvdExperts(nn.Module):
    """The bases and per-expert factors (uninitialised: the loader fills them)."""

    def __init__(self, num_experts: int, hidden: int, inter: int, ranks: dict):
        super().__init__()
        rg, ru, rd = ranks["gate"], ranks["up"], ranks["down"]
        self.gate_U = nn.Parameter(torch.empty(inter, rg))
        self.gate_V = nn.Parameter(torch.empty(num_experts, rg, hidden))
        self.up_U = nn.Parameter(torch.empty(inter, ru))
        self.up_V = nn.Parameter(torch.empty(num_experts, ru, hidden))
        self.down_U = nn.Parameter(torch.empty(hidden, rd))
        self.down_V = nn.Parameter(torch.empty(num_experts, rd, inter))


def svd_experts_forward(x, weights, ids, ex: SvdExperts) -> torch.Tensor:
    """The router-weighted sum of the chosen low-rank experts (``weights``/``ids`` [T, top_k]) -> [T, H]: one
    pass per expert over every token, its router weight 0 where the token did not pick it.  The rank-R factors
    make the extra work small, and nothing depends on the routing or on the token count (no loop over pairs,
    no branch on T), so a dynamic-shape trace of a prefill holds no guard on T."""
    dense = torch.zeros(x.shape[0], ex.gate_V.shape[0], dtype=torch.float32, device=x.device)
    dense.scatter_(1, ids, weights.float())
    z = None
    for e in range(ex.gate_V.shape[0]):
        h = F.silu(F.linear(F.linear(x, ex.gate_V[e]), ex.gate_U)) * F.linear(F.linear(x, ex.up_V[e]), ex.up_U)
        part = F.linear(h, ex.down_V[e]).float() * dense[:, e:e + 1]
        z = part if z is None else z + part
    return F.linear(z.to(x.dtype), ex.down_U)


class SvdMoe(nn.Module):
    """``SparseMoe`` with low-rank experts (module docstring); built from a ``SparseMoe`` made on the meta device,
    whose router and shared expert it materialises on ``device``."""

    def __init__(self, moe: SparseMoe, ranks: dict, device: torch.device):
        super().__init__()
        num_experts, two_i, hidden = moe.experts.gate_up_proj.shape
        del moe.experts
        moe.to_empty(device=device)
        self.top_k, self.renormalize = moe.top_k, moe.renormalize
        self.gate, self.shared_expert, self.shared_expert_gate = moe.gate, moe.shared_expert, moe.shared_expert_gate
        with torch.device(device):
            self.experts = SvdExperts(num_experts, hidden, two_i // 2, ranks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = route_reference(ops.linear(x, self.gate.weight), self.top_k, self.renormalize)
        y = svd_experts_forward(x, weights, ids, self.experts)
        if self.shared_expert is not None:
            y = y + torch.sigmoid(ops.linear(x, self.shared_expert_gate.weight)) * self.shared_expert(x)
        return y


def check_compression(compression) -> dict:
    """The config's ``expert_compression``, validated (errors name the bad value)."""
    if not isinstance(compression, dict) or not isinstance(compression.get("ranks"), dict):
        raise ValueError(f"config expert_compression={compression!r} must be a dict with 'ranks'")
    for part in ("gate", "up", "down"):
        r = compression["ranks"].get(part)
        if not isinstance(r, int) or isinstance(r, bool) or r < 1:
            raise ValueError(f"config expert_compression.ranks.{part}={r!r} must be a positive int")
    return compression


def compressed_class(cls: type, compression: dict) -> type:
    """``cls`` whose sparse MLPs are ``SvdMoe`` with ``compression["ranks"]``: one class per (``cls``, ranks),
    kept as an attribute of this module under its name so that pickle (the compile cache's saved step) finds it
    by reference once the loader has made it again."""
    ranks = check_compression(compression)["ranks"]
    name = f"Svd{cls.__name__}_" + "_".join(f"{part}{r}" for part, r in sorted(ranks.items()))
    if name in globals():
        return globals()[name]

    class Compressed(cls):
        def make_mlp(self, hf_config: dict, layer_idx: int):
            device = torch.empty(0).device  # the device build_model builds on
            with torch.device("meta"):
                mlp = super().make_mlp(hf_config, layer_idx)
            if isinstance(mlp, SparseMoe):
                return SvdMoe(mlp, ranks, device)
            return mlp.to_empty(device=device)

    Compressed.__name__ = Compressed.__qualname__ = name
    Compressed.__module__ = __name__
    globals()[name] = Compressed
    return Compressed
