"""FP8 weights on a GPU: tiny checkpoints of several families, quantized at load time (``quantization="fp8"``) or
stored in the block-FP8 layout, against transformers on the dequantized weights (``quant/fp8_oracle.py``, through
``tools/oracle.run``): float32 token-identical, bfloat16 diverging only at near-ties, in eager and graph mode.  The
Triton kernels serve bfloat16 (the FP8 linear and grouped MoE kernels); float32 takes the twins.

bfloat16 Qwen3-MoE has a second kind of near-tie: the router's.  Where two experts' router logits at the top-k
boundary lie within bf16 noise, our engine and transformers may send a token to different experts; that token's
hidden state then differs by a whole expert, and every later token's through attention, so the first diverging
token's logprob gap is not bounded by bf16 logit noise.  Measured on the CPU (this test's checkpoints and prompts,
the twins, bf16; ``tools/oracle`` with hooks on both routers): online FP8 in graph mode parted on prompt 4 at
token 10 (gap 0.1875 nats, ours third) and prompt 5 at token 2 (0.125, ours second), as on the H100; the block-FP8
checkpoint on prompt 7 at token 14 (0.609, ours third).  Before each, the routers chose other experts at boundary
logit gaps of 0 to 0.031 (layer 0: 0.0078 ours, 0.031 transformers' on prompt 4 position 16; 0.027 and 0.0117 on
prompt 5 position 3); transformers forced to our engine's experts gave our tokens or logit near-ties (<= 0.031
nats) on all 8 prompts.  The Triton kernels (interpreted on the CPU, eager) part the same way (prompt 0, token 11,
0.14 nats, after router gaps of 0 to 0.014).  So such a divergence passes only with the evidence: our token among
transformers' top ``MOE_TOP``, within ``MOE_MARGIN`` nats, transformers' own router within ``ROUTER_TIE`` of a tie
at a position before it, and at most ``MOE_EXCUSED`` prompts so excused; a failure prints every divergence's
verdict with the router's closest boundaries.
"""
import json
import random
from pathlib import Path

import pytest
import torch

from conftest import build_checkpoint

ENGINE = dict(kvcache_block_size=16, graph_batch_sizes=[8], max_model_len=512, max_num_seqs=8,
              num_kvcache_blocks=256)
# hidden 256: two 128-column groups, so the kernels scale partial products per group
SHAPES = dict(hidden_size=256, intermediate_size=512)
MARGIN = 0.1  # nats: a logit near-tie (oracle.run's rule)
# A router near-tie taken the other way: the measured gaps were 0.125 to 0.609 nats, ours second or third (these
# random weights' next-token distributions are flat: the top six within 1 nat).  A wrong expert or scale moves
# tokens out of the top five or by more than this at once, on most prompts.
MOE_MARGIN = 0.75
MOE_TOP = 5
ROUTER_TIE = 1 / 32  # router logits (about 1 to 4) differ by up to 0.027 between the two in bf16; bf16 steps 1/64
# router ties that close occur on nearly every prompt, so the count bounds the excuse: 2 of 8 seen (H100, CPU); a
# planted bug (the top two's weights swapped) parted all 8 at token 0
MOE_EXCUSED = 3
NUM_PROMPTS, MAX_TOKENS = 8, 24
DEVICE = "cuda"
_rng = random.Random(0)  # oracle.run's own prompts (TINY's vocabulary: 384)
PROMPTS = [[_rng.randint(0, 383) for _ in range(_rng.randint(5, 200))] for _ in range(NUM_PROMPTS)]


@pytest.fixture(scope="module", params=["qwen3", "llama", "qwen3_moe"])
def checkpoint(request, tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp(request.param), request.param, **SHAPES)


@pytest.fixture(scope="module")
def block_checkpoint(tmp_path_factory):
    from nanovllm.quant.fp8_checkpoint import quantize_checkpoint_fp8
    path = build_checkpoint(tmp_path_factory.mktemp("block"), "qwen3_moe", **SHAPES)
    quantize_checkpoint_fp8(path, (128, 128))
    return path


def router_evidence(path: str, quantization, verdicts: list[dict]) -> dict:
    """Per diverging prompt: our token's rank in transformers' (bf16, dequantized) distribution at the divergence,
    and its router's three closest top-k boundaries (logit gap between the k-th and the next expert) over every
    position before it and every MoE layer: (gap, position, layer, the experts on each side)."""
    import transformers
    from nanovllm.tools import oracle
    with oracle._transformers_checkpoint(path, quantization, torch.bfloat16) as hf_dir:
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.bfloat16).to(DEVICE).eval()
    seen = []  # per router call, in order: (layer, router logits [rows, E])
    for i, layer in enumerate(hf.model.layers):
        if hasattr(layer.mlp, "gate"):
            layer.mlp.gate.register_forward_hook(lambda m, a, out, i=i: seen.append((i, out[0].float().cpu())))
    top_k = hf.config.num_experts_per_tok
    evidence = {}
    for p, v in enumerate(verdicts):
        if v["status"] == "identical":
            continue
        seen.clear()
        _, logprobs = oracle.hf_greedy_with_logprobs(hf, PROMPTS[p], v["position"] + 1, DEVICE)
        lp = logprobs[v["position"]]
        positions = {}
        ties = []
        for layer, logits in seen:
            start = positions.get(layer, 0)
            positions[layer] = start + logits.shape[0]
            values, experts = logits.sort(dim=-1, descending=True)
            gaps = values[:, top_k - 1] - values[:, top_k]
            for r in range(logits.shape[0]):
                if start + r < len(PROMPTS[p]) + v["position"]:  # the inputs of the diverging token's logits
                    ties.append((round(float(gaps[r]), 5), start + r, layer, experts[r, :top_k + 1].tolist()))
        evidence[p] = dict(rank=int((lp > lp[v["ours"]]).sum()) + 1, closest_router_ties=sorted(ties)[:3])
    return evidence


def failures(verdicts, dtype, path=None, quantization=None) -> list[dict]:
    """The verdicts this test fails: float32 any divergence; bfloat16 one past ``MARGIN``, except for an MoE
    checkpoint (``path`` given) a router near-tie's (the module docstring), reported with its evidence."""
    if dtype == "float32":
        return [v for v in verdicts if v["status"] != "identical"]
    if path is None:
        return [v for v in verdicts if v["status"] not in ("identical", "near-tie")]
    evidence = router_evidence(path, quantization, verdicts)
    bad, excused = [], []
    for p, v in enumerate(verdicts):
        if v["status"] != "MISMATCH":
            continue
        e = evidence[p]
        tie = e["closest_router_ties"] and e["closest_router_ties"][0][0] <= ROUTER_TIE
        if e["rank"] <= MOE_TOP and v["logprob_gap"] <= MOE_MARGIN and tie:
            excused.append({"prompt": p, **v, **e})
        else:
            bad.append({"prompt": p, **v, **e})
    if len(excused) > MOE_EXCUSED:
        bad.append({"router near-ties excused": len(excused), "at most": MOE_EXCUSED})
    if bad:  # the whole picture: every divergence's margins, the excused ones too
        print("router evidence of every divergence:", {p: {**verdicts[p], **e} for p, e in evidence.items()})
    return bad


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graph"])
def test_online_fp8_matches_the_dequantized_oracle(checkpoint, dtype, eager):
    from nanovllm.tools import oracle
    verdicts = oracle.run(checkpoint, dtype, DEVICE, NUM_PROMPTS, MAX_TOKENS, MARGIN, prompts=PROMPTS,
                          enforce_eager=eager, quantization="fp8", **ENGINE)
    moe = json.loads(Path(checkpoint, "config.json").read_text())["model_type"] == "qwen3_moe"
    bad = failures(verdicts, dtype, checkpoint if moe else None, "fp8")
    assert not bad, bad  # in full: pytest would cut a comparison's diff


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_block_fp8_checkpoint_matches_its_dequantized_oracle(block_checkpoint, dtype):
    from nanovllm.tools import oracle
    verdicts = oracle.run(block_checkpoint, dtype, DEVICE, NUM_PROMPTS, MAX_TOKENS, MARGIN, prompts=PROMPTS,
                          enforce_eager=False, **ENGINE)
    bad = failures(verdicts, dtype, block_checkpoint)
    assert not bad, bad
