"""The bf16 verdict for a tiny mixture of experts against transformers: a divergence past the logit margin passes
only when a router near-tie explains it, shown from both engines' routing.

Where two experts' router logits at the top-k boundary lie within bf16 noise, our engine and transformers may send
a token to different experts; that token's hidden state then differs by a whole expert, and every later token's
through attention, so the first diverging token's logprob gap is not bounded by any logit margin (seen on the H100:
a block-FP8 Qwen3-MoE prompt parted at its first token, ours 44th, after a layer-0 boundary gap of 0.00024 ten
tokens before).  So the evidence is the routing itself.  Both engines run the inputs of the diverging token's
logits (the prompt and the common tokens before it; ours in one eager prefill, transformers through its own
``generate``) with hooks on every router.  Each (layer, position) whose top-k sets differ is a *flip*; one at layer
l, position t is *explained* when a flip at a lower layer and a position <= t precedes it (layer l's router input
depends on the lower layers' expert outputs at positions <= t, not on layer l's own).  Where nothing explains a
difference, the two routers' logits must agree within ``ROUTER_NOISE`` (bf16 rounding; a wrong router, expert or
scale differs by whole units), so every flip found is a near-tie by construction.  The divergence then passes when
a flip precedes it.  In graph mode the generated tokens came from decode graphs the eager prefill does not replay
(Inductor rounds differently); with no flip replayed, transformers' own router must come within twice the measured
noise of a tie at a generated position, for at most ``UNSEEN_EXCUSED`` prompts.
"""
import contextlib
import random

import torch

from nanovllm.quant.w8a8_oracle import w8a8_experts

# router logits (about 1 to 4): the engines' bf16 roundings differ by up to 0.049 where no flip explains it on the
# block-FP8 checkpoint's diverging prompts (CPU twins), 0.156 on GPTQ Mixtral's (H100); two experts' logits swapped
# as a planted bug: 3.2 to 4.4 (CPU)
ROUTER_NOISE = 1 / 2
UNSEEN_EXCUSED = 2  # of 8 prompts
_rng = random.Random(0)  # the tiny checkpoints' vocabulary is 384
PROMPTS = [[_rng.randint(0, 383) for _ in range(_rng.randint(5, 200))] for _ in range(8)]


def _our_routes(path: str, dtype: str, engine: dict, sequence: list[int], **llm_kwargs) -> list[torch.Tensor]:
    """Our router logits [len(sequence), E] per MoE layer, from one eager prefill of ``sequence``."""
    from nanovllm import LLM, SamplingParams
    from nanovllm.kernels import ops
    from nanovllm.models.moe import SparseMoe
    llm = LLM(path, dtype=dtype, enforce_eager=True, **{**engine, **llm_kwargs})
    layers = [m for m in llm.engine.runner.model.modules() if isinstance(m, SparseMoe)]
    seen = [[] for _ in layers]
    for i, moe in enumerate(layers):
        moe.register_forward_pre_hook(lambda m, args, i=i: seen[i].append(
            ops.linear(args[0], m.gate.weight).float().cpu()))
    llm.generate([sequence], SamplingParams(temperature=0, max_tokens=1, ignore_eos=True), use_tqdm=False)
    del llm
    routes = [torch.cat(rows) for rows in seen]  # the prefill's rows, then any step queued behind it
    assert all(r.shape[0] >= len(sequence) for r in routes), (len(sequence), [r.shape for r in routes])
    return [r[:len(sequence)] for r in routes]


def _their_routes(hf, prompt: list[int], position: int, device) -> tuple[list[torch.Tensor], torch.Tensor, list]:
    """transformers' router logits per MoE layer over the prompt and its first ``position`` greedy tokens, its
    logprobs at ``position``, and those tokens."""
    from nanovllm.tools import oracle
    gates = [layer.mlp.gate for layer in hf.model.layers if hasattr(layer.mlp, "gate")]
    seen = [[] for _ in gates]
    hooks = [g.register_forward_hook(lambda m, a, out, i=i: seen[i].append(out[0].float().cpu()))
             for i, g in enumerate(gates)]
    try:
        tokens, logprobs = oracle.hf_greedy_with_logprobs(hf, prompt, position + 1, device)
    finally:
        for h in hooks:
            h.remove()
    rows = len(prompt) + position  # the prefill, then one row per token before the diverging one
    return [torch.cat(s)[:rows] for s in seen], logprobs[position], tokens[:position]


def flips(ours: list[torch.Tensor], theirs: list[torch.Tensor], top_k: int) -> tuple[list[dict], float]:
    """Every (layer, position) where the two top-k sets differ, with transformers' gap (how far below its k-th
    logit the experts only we chose lie) and whether a lower layer's flip at a position <= it explains it; and the
    noise: the largest |ours - theirs| router logit at every position no lower layer's flip explains."""
    found, noise = [], 0.0
    first_below = None  # the earliest position of a flip at a lower layer
    for layer, (a, b) in enumerate(zip(ours, theirs)):
        ours_top, theirs_top = a.topk(top_k).indices, b.topk(top_k).indices
        kth = b.topk(top_k).values[:, -1]
        unexplained_rows = b.shape[0] if first_below is None else first_below
        noise = max(noise, float((a - b)[:unexplained_rows].abs().max())) if unexplained_rows else noise
        at_layer = []
        for t in range(b.shape[0]):
            only_ours = set(ours_top[t].tolist()) - set(theirs_top[t].tolist())
            if only_ours:
                gap = max(float(kth[t] - b[t, e]) for e in only_ours)
                at_layer.append(dict(layer=layer, position=t, gap=round(gap, 5), explained=t >= unexplained_rows,
                                     ours=sorted(ours_top[t].tolist()), theirs=sorted(theirs_top[t].tolist())))
        if at_layer:
            found += at_layer
            lowest = at_layer[0]["position"]
            first_below = lowest if first_below is None else min(first_below, lowest)
    return found, noise


def closest_boundary(theirs: list[torch.Tensor], top_k: int, start: int) -> float:
    """transformers' smallest gap between its k-th and (k+1)-th router logit at positions >= ``start``."""
    gaps = [v[:, top_k - 1] - v[:, top_k] for v in (t[start:].topk(top_k + 1).values for t in theirs)]
    return round(float(torch.cat(gaps).min()), 5) if gaps and gaps[0].numel() else float("inf")


def moe_failures(verdicts: list[dict], path: str, dtype: str, engine: dict, device, graph: bool,
                 **llm_kwargs) -> list[dict]:
    """The bf16 verdicts of ``oracle.run(path, prompts=PROMPTS)`` this rule fails (the module docstring); a failure
    prints every divergence with its evidence."""
    import transformers
    from nanovllm.tools import oracle
    mismatches = [(p, v) for p, v in enumerate(verdicts) if v["status"] == "MISMATCH"]
    if not mismatches:
        return []
    torch_dtype = getattr(torch, dtype)
    with oracle._transformers_checkpoint(path, llm_kwargs.get("quantization"), torch_dtype) as hf_dir:
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch_dtype).to(device).eval()
    top_k = hf.config.num_experts_per_tok
    with w8a8_experts(verdicts[0]["w8a8"]) if verdicts[0].get("w8a8") else contextlib.nullcontext():  # as oracle.run
        theirs = {p: _their_routes(hf, PROMPTS[p], v["position"], device) for p, v in mismatches}
    del hf
    bad, evidence, unseen = [], {}, 0
    for p, v in mismatches:
        routes, logprobs, common = theirs[p]
        ours = _our_routes(path, dtype, engine, PROMPTS[p] + common, **llm_kwargs)
        found, noise = flips(ours, routes, top_k)
        e = evidence[p] = dict(v, rank=int((logprobs > logprobs[v["ours"]]).sum()) + 1, noise=round(noise, 5),
                               flips=len(found), unexplained=[f for f in found if not f["explained"]][:4])
        if not found and graph:  # a flip in a decode graph, which the eager prefill does not replay
            e["generated_boundary"] = closest_boundary(routes, top_k, len(PROMPTS[p]))
            unseen += 1
        if noise > ROUTER_NOISE or (not found and not (graph and e["generated_boundary"] <= 2 * noise)):
            bad.append({"prompt": p, **e})
    if unseen > UNSEEN_EXCUSED:
        bad.append({"divergences with no flip replayed": unseen, "at most": UNSEEN_EXCUSED})
    if bad:
        print("router evidence of every divergence:", evidence)
    return bad
