"""The peer available on our GPU image: transformers' continuous batching on bench.py's workload and checkpoint.

    python benchmarks/peer_hf.py [--model DIR] [--attn paged|sdpa] [--num-seqs 256] [--nanovllm]

Runs the same prompts and per-request ``max_tokens`` as ``bench.py`` (temperature 0.6, no early stop) through
``model.init_continuous_batching()``; with ``--nanovllm`` it also runs nanovllm in the same process and
prints the ratio.  Run on an H100 with transformers 5.17: 562 tok/s against nanovllm's 19,295 (34.3x;
docs/PERFORMANCE.md).
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench import workload  # noqa: E402
from common import default_model  # noqa: E402  (benchmarks/common.py)


def run_transformers(model_dir: str, prompts, params, attn: str, device: str) -> dict:
    from transformers import AutoModelForCausalLM, GenerationConfig
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, attn_implementation=attn).to(device).eval()
    config = GenerationConfig(do_sample=True, temperature=0.6, max_new_tokens=max(p.max_tokens for p in params),
                              eos_token_id=None, pad_token_id=0)
    manager = model.init_continuous_batching(generation_config=config)
    manager.start()
    try:
        t = time.perf_counter()
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            manager.add_request(prompt, request_id=str(i), max_new_tokens=p.max_tokens)
        generated, done = 0, 0
        while done < len(prompts):
            result = manager.get_result(timeout=600)
            if result is None:
                raise RuntimeError("transformers continuous batching stopped returning results")
            generated += len(result.generated_tokens)
            done += 1
        seconds = time.perf_counter() - t
    finally:
        manager.stop(block=True)
    return {"engine": f"transformers continuous batching ({attn})", "tokens": generated, "seconds": seconds,
            "tok_per_s": generated / seconds}


def run_nanovllm(model_dir: str, prompts, params, device: str) -> dict:
    from nanovllm import LLM
    llm = LLM(model_dir, device=device, max_model_len=4096, max_num_seqs=len(prompts))
    t = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - t
    tokens = sum(len(o["token_ids"]) for o in outs)
    return {"engine": "nanovllm", "tokens": tokens, "seconds": seconds, "tok_per_s": tokens / seconds}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--attn", default="paged|sdpa")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--max-input-len", type=int, default=1024)
    p.add_argument("--max-output-len", type=int, default=1024)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--nanovllm", action="store_true", help="also run nanovllm and print the ratio")
    args = p.parse_args()
    if args.model is None:
        args.model = default_model()
    prompts, params = workload(args.num_seqs, args.max_input_len, args.max_output_len)
    results = [run_transformers(args.model, prompts, params, args.attn, args.device)]
    if args.nanovllm:
        results.append(run_nanovllm(args.model, prompts, params, args.device))
    for r in results:
        print(json.dumps(r))
    if len(results) == 2:
        print(f"nanovllm / transformers: {results[1]['tok_per_s'] / results[0]['tok_per_s']:.1f}x")


if __name__ == "__main__":
    main()
