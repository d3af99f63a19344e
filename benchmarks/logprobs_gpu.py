"""Logprobs on a GPU (by hand, not in CI): graph mode against eager mode on a tiny random Qwen3, float32 and
bfloat16, with a batch mixing requests with and without logprobs; prints the largest logprob gap, whether the
tokens agree, the logprobs variant's buckets, and the decode seconds of a batch with and without logprobs.

    python benchmarks/logprobs_gpu.py [--bs 64]
"""
import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
os.environ.setdefault("TRITON_INTERPRET", "0")  # tests/conftest.py would switch Triton to its CPU interpreter


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--bs", type=int, default=64)
    args = p.parse_args()
    from conftest import build_checkpoint
    from nanovllm import LLM, SamplingParams
    path = build_checkpoint(tempfile.mkdtemp(), "qwen3")
    engine = dict(max_num_seqs=args.bs, kvcache_block_size=16, num_kvcache_blocks=1024, max_model_len=256)
    prompts = [[5 + i, 6 + 2 * i, 7, 8 + i % 5][: 2 + i % 3] for i in range(args.bs)]
    kinds = [dict(), dict(logprobs=0), dict(logprobs=5), dict(logprobs=20, temperature=1.0, top_k=8),
             dict(temperature=0.7, top_p=0.9)]
    params = [SamplingParams(**{"temperature": 0, "max_tokens": 16, "ignore_eos": True, "seed": i, **kinds[i % 5]})
              for i in range(args.bs)]
    report = {}
    for dtype in ("float32", "bfloat16"):
        graph = LLM(path, dtype=dtype, **engine)
        eager = LLM(path, dtype=dtype, enforce_eager=True, **engine)
        plain_before = graph.generate(prompts, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
        g, e = (llm.generate(prompts, params, use_tqdm=False) for llm in (graph, eager))
        gap, same = 0.0, all(a["token_ids"] == b["token_ids"] for a, b in zip(g, e))
        ids_same = True
        for a, b in zip(g, e):
            for x, y in zip(a.get("logprobs", []), b.get("logprobs", [])):
                ids_same &= list(x) == list(y)
                gap = max(gap, max((abs(x[t] - y[t]) for t in x if t in y), default=0.0))  # bf16 may diverge
        plain_after = graph.generate(prompts, SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)
        timing = {}
        for name, lp in (("plain", None), ("logprobs", 5)):
            sp = SamplingParams(temperature=0, max_tokens=64, ignore_eos=True, logprobs=lp)
            graph.generate(prompts, sp, use_tqdm=False)
            t = time.perf_counter()
            graph.generate(prompts, sp, use_tqdm=False)
            timing[name] = round(time.perf_counter() - t, 3)
        report[dtype] = {"tokens_equal": same, "top_ids_equal": ids_same, "max_logprob_gap": gap,
                         "plain_unchanged": [o["token_ids"] for o in plain_before] ==
                         [o["token_ids"] for o in plain_after],
                         "describe": {k: v for k, v in graph.engine.describe().items()
                                      if k in ("mode", "logprob_graph_sizes", "compile_cache")},
                         "generate_seconds_64_tokens": timing}
        print(json.dumps({dtype: report[dtype]}), flush=True)


if __name__ == "__main__":
    main()
