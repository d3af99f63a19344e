"""GPT-OSS (gpt-oss-20b, gpt-oss-120b; ``GptOssForCausalLM``) with float32 or 16-bit weights: the shared decoder
(``decoder.py``) plus what transformers' ``modeling_gpt_oss.py`` adds, computed as it does: q/k/v/o biases; a
learned sink logit per query head and, on ``sliding_attention`` layers (``layer_types``; by default the even ones),
a window of ``sliding_window`` keys, the query's own included (``ops.paged_attention``'s ``sinks``, ``window``);
YaRN rope (``rope_parameters``); and in every layer a mixture of experts (``GptOssMoe``): a router with a bias,
experts with biases and the clamped SwiGLU (``ops.fused_moe``'s ``"swiglu_oss"``).

Checkpoints: transformers' and OpenAI's names; the stacked experts interleaved and transposed (``GATE_UP``, ``DOWN``
below), read into ours (``moe.Experts``) by the loader.  Under tensor parallelism each rank holds its heads (and
their sinks) and its slice of every expert's intermediate; the down bias is added on the first rank only.

MXFP4 experts (the published checkpoints') are the ``mxfp4`` scheme's (``quant/mxfp4_schemes.py``): it fills
``GptOssExperts`` as schemes fill ``moe.Experts``, and ``quant/held.py`` hands them to the op.  Not yet: expert
offloading and low-rank expert compression (refused).
"""
import torch
from torch import nn

import nanovllm.distributed as distributed
from nanovllm.kernels import ops
from nanovllm.models import tensor_parallel as tp
from nanovllm.models.decoder import DecoderForCausalLM
from nanovllm.models.moe import Experts, MoeArgs
from nanovllm.models.placement import StoredLayout
from nanovllm.quant import held

SLIDING, FULL = "sliding_attention", "full_attention"


def layer_types(cfg: dict) -> list[str]:
    """Each layer's attention kind from the config (checked); by default sliding on even layers, as transformers."""
    n = cfg["num_hidden_layers"]
    types = cfg.get("layer_types") or [SLIDING if (i + 1) % 2 else FULL for i in range(n)]
    bad = sorted(set(types) - {SLIDING, FULL})
    if len(types) != n or bad:
        raise ValueError(f"config layer_types must name {n} layers, each {SLIDING!r} or {FULL!r}; got {len(types)} "
                         f"with {bad or 'no'} unknown kinds")
    return list(types)


# The checkpoint's experts: gate_up_proj [E, H, 2I] with gate and up interleaved on the last dim (gate [..., ::2],
# up [..., 1::2]), gate_up_proj_bias [E, 2I] likewise, down_proj [E, I, H], down_proj_bias [E, H] (ours as is).
# Ours: w13 [E, 2I, H] gate rows then up rows, w2 [E, H, I].  A rank's slice of the intermediate is one contiguous
# run of the interleaved columns (its gate and up columns alternate there), cut before de-interleaving.
def deinterleave(t: torch.Tensor) -> torch.Tensor:
    """The last dim's even entries (gate) then its odd ones (up)."""
    return torch.cat([t[..., 0::2], t[..., 1::2]], dim=-1)


GATE_UP = StoredLayout(dims=(0, 2, 1), split_dim=2, to_ours=lambda t: deinterleave(t).transpose(1, 2))
GATE_UP_BIAS = StoredLayout(dims=(0, 1), split_dim=1, to_ours=deinterleave)
DOWN = StoredLayout(dims=(0, 2, 1), split_dim=1, to_ours=lambda t: t.transpose(1, 2))


class GptOssExperts(Experts):
    """The stacked experts (``moe.Experts``: a quantization scheme holds ``gate_up_proj``/``down_proj`` as it holds
    any model's) and their biases: ``gate_up_proj_bias`` [E, 2I] (gate half, then up) and ``down_proj_bias``
    [E, H]."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__(num_experts, hidden_size, intermediate_size)
        self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size))
        self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden_size))


class GptOssMoe(nn.Module):
    reducible = True  # ``forward(x, reduce=False)`` gives this rank's part before the sum

    def __init__(self, hidden_size: int, m: MoeArgs, alpha: float, limit: float):
        super().__init__()
        self.top_k, self.alpha, self.limit = m.top_k, alpha, limit
        self.router = nn.Linear(hidden_size, m.num_experts, bias=True)
        self.experts = GptOssExperts(m.num_experts, hidden_size, tp.split(m.intermediate_size, "intermediate_size"))

    def quant_targets(self) -> list[tuple[nn.Module, str, bool]]:
        ex = self.experts
        return [(ex, "gate_up_proj", False), (ex, "down_proj", True)]

    def forward(self, x: torch.Tensor, reduce: bool = True) -> torch.Tensor:
        """As ``SparseMoe.forward``: summed over the ranks, or (``reduce=False``) this rank's part."""
        # transformers routes by a softmax over the top-k logits; ``renormalize=True`` takes a float32 softmax over
        # all of them, its top k, divided by their sum: the same experts (softmax is monotonic) and the same weights,
        # exp(l_i - m) / sum_topk exp(l_j - m) with m the largest logit either way, up to float32 rounding of a few
        # ulps (as any reordered sum); Mixtral routes alike.  The tests check greedy tokens against transformers.
        logits = ops.linear(x, self.router.weight, self.router.bias)
        ex = self.experts
        y = ops.fused_moe(x, logits, ex.gate_up_proj, ex.down_proj, self.top_k, True, *held.expert_args(ex),
                          w13_bias=ex.gate_up_proj_bias, w2_bias=ex.down_proj_bias if tp.first_rank() else None,
                          activation="swiglu_oss", swiglu_alpha=self.alpha, swiglu_limit=self.limit)
        return distributed.all_reduce(y) if reduce else y


class GptOssForCausalLM(DecoderForCausalLM):
    expert_weights: dict = {}
    stored_layouts = {".experts.gate_up_proj": GATE_UP, ".experts.gate_up_proj_bias": GATE_UP_BIAS,
                      ".experts.down_proj": DOWN}

    def __init__(self, hf_config: dict):
        if "expert_compression" in hf_config:
            raise ValueError("GptOssForCausalLM: expert_compression (low-rank experts) is not supported")
        self.kinds = layer_types(hf_config)
        super().__init__(hf_config)

    def attention_options(self, hf_config: dict, layer_idx: int) -> dict:
        window = hf_config.get("sliding_window") or 0
        return dict(window=window if self.kinds[layer_idx] == SLIDING else 0, sinks=True)

    def make_mlp(self, hf_config: dict, layer_idx: int) -> nn.Module:
        moe = MoeArgs.from_hf(hf_config, experts_keys=("num_local_experts", "num_experts"),
                              intermediate_key="intermediate_size", renormalize=True)
        return GptOssMoe(self.args.hidden_size, moe, float(hf_config.get("swiglu_alpha", 1.702)),
                         float(hf_config.get("swiglu_limit", 7.0)))
