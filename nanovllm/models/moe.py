"""The mixture-of-experts MLP that MoE architectures put in place of a decoder layer's dense MLP.

``SparseMoe(x)``: router logits (``ops.linear`` with the router weight ``gate`` [E, H]), then one op,
``ops.fused_moe``, for routing, the experts and the weighted top-k sum (``kernels/moe_reference.py`` states its
contract), plus, where the architecture has one, a shared expert scaled by a sigmoid gate (Qwen2-MoE).  The
experts are stacked: ``experts.gate_up_proj`` [E, 2I, H] (gate rows, then up) and ``experts.down_proj`` [E, H, I],
the names transformers itself uses for them in memory; the loader stacks checkpoints' per-expert tensors into
them (``placement.py``, named by each model file).  Quantized experts carry their format's scales (and int4 ones
zeros), passed to the op by ``quant/held.py``.  Every shape is static, so an MoE layer
is captured in graph mode like a dense one.
"""
import contextlib
import contextvars
from dataclasses import dataclass

import torch
from torch import nn

import nanovllm.distributed as distributed
from nanovllm.kernels import ops
from nanovllm.models import tensor_parallel as tp
from nanovllm.quant import held
from nanovllm.models.decoder import MLP


@dataclass(frozen=True)
class MoeArgs:
    num_experts: int
    top_k: int
    intermediate_size: int  # per expert
    renormalize: bool  # divide the top-k probabilities by their sum
    shared_intermediate_size: int = 0  # the shared expert's (Qwen2-MoE); 0: none
    # the op's ``round_weights``: top-k weights rounded to the activations' dtype, as transformers' Qwen MoE routers
    # do (Qwen2/3-MoE, Qwen3-Next, Qwen3.5-MoE); Mixtral's keeps them float32
    round_weights: bool = False

    @classmethod
    def from_hf(cls, cfg: dict, *, experts_keys: tuple[str, ...], intermediate_key: str, renormalize: bool,
                shared_key: str | None = None, round_weights: bool = False) -> "MoeArgs":
        """Read from an HF config; the first of ``experts_keys`` present gives the number of experts; with
        ``shared_key`` the architecture has a shared expert, whose size must be given."""
        key = next((k for k in experts_keys if cfg.get(k) is not None), None)
        if key is None:
            raise ValueError(f"the config gives no number of experts (looked for {', '.join(experts_keys)})")
        args = cls(num_experts=cfg[key], top_k=cfg.get("num_experts_per_tok"),
                   intermediate_size=cfg.get(intermediate_key), renormalize=bool(renormalize),
                   shared_intermediate_size=cfg.get(shared_key) if shared_key else 0, round_weights=round_weights)
        checked = [(key, args.num_experts), ("num_experts_per_tok", args.top_k),
                   (intermediate_key, args.intermediate_size)]
        if shared_key:  # missing or 0 would drop the checkpoint's shared expert without a word
            checked.append((shared_key, args.shared_intermediate_size))
        for name, value in checked:
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"config {name}={value!r} must be a positive int")
        if args.top_k > args.num_experts:
            raise ValueError(f"config num_experts_per_tok={args.top_k} exceeds the {args.num_experts} experts "
                             f"({key})")
        return args


_DEFERRED = contextvars.ContextVar("deferred_experts", default=False)


@contextlib.contextmanager
def deferred_experts():
    """While a model is built: ``Experts`` stacks made on the meta device, for dummy weights that a scheme draws
    straight into its held format an expert at a time (``QuantScheme.draw_held``: never whole in 16 bits)."""
    token = _DEFERRED.set(True)
    try:
        yield
    finally:
        _DEFERRED.reset(token)


class Experts(nn.Module):
    """The stacked expert weights (uninitialised: the loader fills them; on the meta device under
    ``deferred_experts``)."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        device = "meta" if _DEFERRED.get() else None
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size, device=device))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size, device=device))


class SparseMoe(nn.Module):
    reducible = True  # ``forward(x, reduce=False)`` gives this rank's part before the sum

    def __init__(self, hidden_size: int, m: MoeArgs):
        super().__init__()
        self.top_k, self.renormalize, self.round_weights = m.top_k, m.renormalize, m.round_weights
        self.gate = nn.Linear(hidden_size, m.num_experts, bias=False)
        # tensor parallelism: each rank holds every expert's slice of the intermediate size (tensor_parallel.py)
        self.experts = Experts(m.num_experts, hidden_size, tp.split(m.intermediate_size, "moe_intermediate_size"))
        self.shared_expert = MLP(hidden_size, m.shared_intermediate_size, reduce=False) \
            if m.shared_intermediate_size else None
        self.shared_expert_gate = nn.Linear(hidden_size, 1, bias=False) if m.shared_intermediate_size else None

    def quant_targets(self) -> list[tuple[nn.Module, str, bool]]:
        """The stacked experts' (``Experts`` only: not low-rank ones), then the shared expert's."""
        ex = self.experts
        own = [(ex, "gate_up_proj", False), (ex, "down_proj", True)] if isinstance(ex, Experts) else []
        return own + (self.shared_expert.quant_targets() if self.shared_expert is not None else [])

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """The block's output summed over the ranks; ``reduce=False``: this rank's part (its slice of every expert
        and of the shared expert), for a caller that fuses the sum (``decoder._after_attention``)."""
        logits = ops.linear(x, self.gate.weight)
        ex = self.experts
        y = ops.fused_moe(x, logits, ex.gate_up_proj, ex.down_proj, self.top_k, self.renormalize,
                          *held.expert_args(ex),  # scales and group, zeros: a quantized stack's (quant/held.py)
                          round_weights=self.round_weights)
        if self.shared_expert is not None:
            y = y + torch.sigmoid(ops.linear(x, self.shared_expert_gate.weight)) * self.shared_expert(x)
        return distributed.all_reduce(y) if reduce else y


def expert_footprint(model: nn.Module) -> tuple[int, float]:
    """(bytes of all routed experts' weights, share of a layer's experts one token is routed to: top_k / E) for
    the byte floor of a decode step (``benchmarks/common.step_weight_bytes``); (0, 0.0) for a dense model."""
    layers = [m for m in model.modules() if isinstance(m, SparseMoe)]
    nbytes = sum(p.numel() * p.element_size() for m in layers for p in m.experts.parameters())
    return nbytes, (layers[0].top_k / layers[0].experts.gate_up_proj.shape[0]) if layers else 0.0
