"""Decode attention launch policies on bench-like batches (CUDA): TMA tile loads or pointer loads
(``NANOVLLM_DECODE_TMA``), legacy splits sized for 2-16 waves of SMs, and the chunk and stream-K variants.

    python benchmarks/decode_policy.py [--layers 28] [--batches 256,128,64,32,16,4]

Per batch size, contexts are drawn as in bench.py's workload halfway through its decode (prompt 100-1024 tokens
plus part of its output), rows sorted longest first as the scheduler hands them over, each row's KV blocks
shuffled over a Qwen3-0.6B-shaped cache (Hq 16, Hkv 8, D 128, block 64, bf16).  ``--layers`` copies of the cache
stand for the layers, so a CUDA graph of one launch per layer reads from memory as a real step does.  Prints
microseconds per launch and the KV read rate in TB/s per policy, and the largest difference of each output from
the default's.  Writes $OUT/decode_policy.json.
"""
import argparse
import os
import random
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import graph_us, write_json  # noqa: E402
from nanovllm.kernels import triton_decode as td  # noqa: E402


def batch(bs: int, layers: int, block: int = 64, hq: int = 16, hkv: int = 8, d: int = 128):
    rnd = random.Random(bs)
    ctx = sorted((rnd.randint(100, 1024) + rnd.randint(0, 512) for _ in range(bs)), reverse=True)
    widths = [-(-c // block) for c in ctx]
    blocks = sum(widths)
    perm = torch.randperm(blocks).int()
    table = torch.zeros(bs, 4096 // block, dtype=torch.int32)
    at = 0
    for i, w in enumerate(widths):
        table[i, :w] = perm[at:at + w]
        at += w
    caches = [(torch.randn(blocks, hkv, block, d, dtype=torch.bfloat16, device="cuda"),
               torch.randn(blocks, hkv, block, d, dtype=torch.bfloat16, device="cuda")) for _ in range(layers)]
    q = torch.randn(bs, hq, d, dtype=torch.bfloat16, device="cuda")
    kv_bytes = 2 * sum(ctx) * hkv * d * 2
    return q, caches, table.cuda(), torch.tensor(ctx, dtype=torch.int32, device="cuda"), kv_bytes


POLICIES = {  # name -> (NANOVLLM_DECODE_TMA, keyword arguments of decode_attention_configured)
    "pointer": ("0", {"variant": "legacy"}), "default": ("1", {}),
    **{f"waves{w}": ("1", {"waves": w}) for w in (4, 8, 16)},
    "chunk": ("1", {"variant": "chunk"}), "chunk_rev": ("1", {"variant": "chunk_rev"}),
    "streamk": ("1", {"variant": "streamk"}),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--batches", default="256,192,128,96,64,48,32,16,4")
    args = p.parse_args()
    rows = []
    print("| batch | " + " | ".join(f"{n} us (TB/s)" for n in POLICIES) + " | max abs diff |")
    print("|---" * (len(POLICIES) + 2) + "|")
    for bs in (int(b) for b in args.batches.split(",")):
        q, caches, table, ctx, kv_bytes = batch(bs, args.layers)
        result, diff, base = {"batch": bs}, 0.0, None
        for name, (tma, kw) in POLICIES.items():
            os.environ["NANOVLLM_DECODE_TMA"] = tma
            calls = [lambda k=k, v=v, kw=kw: td.decode_attention_configured(q, k, v, table, ctx, 0.088, **kw)
                     for k, v in caches]
            us = graph_us(calls)
            result[name] = {"us": round(us, 2), "tbps": round(kv_bytes / us / 1e6, 3)}
            out = calls[0]().float()
            base = out if base is None else base
            diff = max(diff, (out - base).abs().max().item())
        result["max_abs_diff"] = diff
        rows.append(result)
        print(f"| {bs} | " + " | ".join(f"{result[n]['us']} ({result[n]['tbps']})" for n in POLICIES)
              + f" | {diff:.1e} |")
        del caches
        torch.cuda.empty_cache()
    os.environ.pop("NANOVLLM_DECODE_TMA")
    write_json("decode_policy.json", rows)


if __name__ == "__main__":
    main()
