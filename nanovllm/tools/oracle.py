"""Compare nanovllm's greedy output with Hugging Face transformers on one checkpoint (the correctness oracle).

    python -m nanovllm.tools.oracle MODEL_DIR [--dtype float32|bfloat16] [--device cuda] [--num-prompts 8]

float32 must be token-identical.  In lower precision the rule of DESIGN.md applies: the first position where
the two outputs diverge must be one where transformers' top two candidates are within ``--margin`` nats.
transformers has no MiniCPM class: for a MiniCPM checkpoint it runs the equivalent Llama checkpoint, written to a
temporary directory by ``nanovllm.tools.minicpm``.  With ``--kv-cache-dtype fp8`` transformers' attention first
passes each layer's K and V through the FP8 cache's rounding with our engine's scales (``fp8_kv_attention``); FP8
weights (a block-FP8 checkpoint, or ``--quantization fp8``) are run by transformers dequantized (``fp8_oracle.py``),
GPTQ and AWQ checkpoints likewise (``int4_oracle.py``); W8A8 FP8 experts with their activation rounding
(``quant/w8a8_oracle.py``).  Exits non-zero on a failure: a check on checkpoints the tests have never seen.
"""
import argparse
import contextlib
import json
import random
import sys
import tempfile
from pathlib import Path

import torch

from nanovllm.quant.w8a8_oracle import engine_w8a8, w8a8_experts


def hf_greedy_with_logprobs(model, prompt: list[int], max_new_tokens: int, device):
    """transformers' greedy tokens, plus its log-probabilities at each generated position."""
    x = torch.tensor([prompt], device=device)
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    logprobs = [s[0].float().log_softmax(-1) for s in out.scores]
    return tokens, logprobs


def fp8_kv_attention(scales: list) -> str:
    """Register, and name, a transformers attention function that rounds layer i's K and V as an FP8 KV cache with
    ``scales[i]`` = (k_scale, v_scale) [KV heads] does (``kv_quant.round_trip``), then runs transformers' SDPA.
    transformers caches K and V unrounded and rounds them at every step: the same values as our cache's."""
    import transformers
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from nanovllm.kernels import kv_quant

    def rounded(x, scale):  # x [B, Hkv, S, D]
        return kv_quant.round_trip(x.transpose(1, 2), scale.to(x.device)).transpose(1, 2).to(x.dtype)

    def attention(module, query, key, value, attention_mask, **kwargs):
        k_scale, v_scale = scales[module.layer_idx]
        return sdpa_attention_forward(module, query, rounded(key, k_scale), rounded(value, v_scale), attention_mask,
                                      **kwargs)

    transformers.AttentionInterface.register("nanovllm_fp8_kv", attention)
    return "nanovllm_fp8_kv"


def engine_kv_scales(llm) -> list | None:
    """Each layer's (k_scale, v_scale) of an engine with an FP8 KV cache, None for a layer without attention (None
    without such a cache)."""
    from nanovllm.models.kv_scales import attention_layers
    if not llm.config.fp8_kv_cache:
        return None
    return [a and (a.k_scale.cpu(), a.v_scale.cpu()) for a in attention_layers(llm.engine.runner.model)]


def compare(ours: list[int], theirs: list[int], logprobs, margin: float, exact: bool) -> dict:
    """Verdict for one prompt: identical, an allowed near-tie divergence, or a failure."""
    for i, (a, b) in enumerate(zip(ours, theirs)):
        if a != b:
            lp = logprobs[i]
            gap = float(lp[b] - lp[a])
            top2 = lp.topk(2).values
            tie_gap = float(top2[0] - top2[1])
            ok = not exact and gap <= margin
            return {"status": "near-tie" if ok else "MISMATCH", "position": i, "ours": a, "theirs": b,
                    "logprob_gap": round(gap, 5), "top2_gap": round(tie_gap, 5)}
    return {"status": "identical"}


def run(model_dir: str, dtype: str, device: str, num_prompts: int, max_tokens: int, margin: float,
        prompts: list[list[int]] | None = None, **llm_kwargs) -> list[dict]:
    import transformers
    from nanovllm import LLM, SamplingParams
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    llm = LLM(model_dir, dtype=dtype, device=device, **llm_kwargs)
    dev = llm.engine.runner.device
    vocab = llm.engine.runner.vocab_size
    if prompts is None:
        rng = random.Random(0)
        prompts = [[rng.randint(0, min(vocab, 10000) - 1) for _ in range(rng.randint(5, 200))]
                   for _ in range(num_prompts)]
    ours = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                        use_tqdm=False)
    scales = engine_kv_scales(llm)
    # its FP8 experts round activations (each rank its slice's): transformers' must too; 0 where they do not
    w8a8 = llm_kwargs.get("tensor_parallel_size", 1) if engine_w8a8(llm.engine.runner.model) else 0
    del llm
    attention = {} if scales is None else {"attn_implementation": fp8_kv_attention(scales)}
    with _transformers_checkpoint(model_dir, llm_kwargs.get("quantization"), torch_dtype) as hf_dir:
        hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch_dtype, **attention).to(dev).eval()
    verdicts = []
    for prompt, out in zip(prompts, ours):
        with w8a8_experts(w8a8) if w8a8 else contextlib.nullcontext():
            theirs, logprobs = hf_greedy_with_logprobs(hf, prompt, max_tokens, dev)
        verdicts.append(dict(compare(out["token_ids"], theirs, logprobs, margin, exact=dtype == "float32"),
                             w8a8=w8a8))
    return verdicts


@contextlib.contextmanager
def _transformers_checkpoint(model_dir: str, quantization: str | None = None, dtype=torch.float32):
    """``model_dir``, or in a temporary directory: for a MiniCPM checkpoint its Llama equivalent, for quantized
    weights (a checkpoint's, or ``quantization``'s) their dequantized values (``quant.registry.write_oracle``), or
    both."""
    from nanovllm.quant import registry
    from nanovllm.tools import minicpm
    config = json.loads((Path(model_dir) / "config.json").read_text())
    minicpm_model = config.get("model_type") in minicpm.MODEL_TYPES
    checkpoint = registry.checkpoint_scheme(config)
    if not minicpm_model and checkpoint is None and quantization is None:
        yield model_dir
        return
    with tempfile.TemporaryDirectory(prefix="nanovllm-oracle-") as tmp:
        path = str(minicpm.to_llama(model_dir, f"{tmp}/llama")) if minicpm_model else model_dir
        quantized = checkpoint is not None or quantization is not None
        yield registry.write_oracle(path, f"{tmp}/dequantized", quantization, dtype) if quantized else path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto")
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--margin", type=float, default=0.1, help="allowed logprob gap at a divergence (nats)")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8", "fp8_e4m3"])
    p.add_argument("--quantization", default=None, choices=["fp8"])
    args = p.parse_args()
    verdicts = run(args.model, args.dtype, args.device, args.num_prompts, args.max_tokens, args.margin,
                   enforce_eager=args.enforce_eager, max_model_len=1024, kv_cache_dtype=args.kv_cache_dtype,
                   quantization=args.quantization)
    for v in verdicts:
        print(json.dumps(v))
    failed = sum(v["status"] == "MISMATCH" for v in verdicts)
    print(f"{len(verdicts) - failed}/{len(verdicts)} prompts pass ({args.dtype}, margin {args.margin})")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
