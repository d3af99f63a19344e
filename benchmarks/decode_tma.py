"""Decode attention with and without TMA tile loads (``NANOVLLM_DECODE_TMA``), on bench-like batches (CUDA).

    python benchmarks/decode_tma.py [--layers 28]

Per batch size, contexts are drawn as in bench.py's workload halfway through its decode (prompt 100-1024 tokens
plus part of its output), rows sorted longest first as the scheduler hands them over, each row's KV blocks
shuffled over a Qwen3-0.6B-shaped cache (Hq 16, Hkv 8, D 128, block 64, bf16).  ``--layers`` copies of the cache
stand for the layers, so a CUDA graph of one launch per layer reads from memory as a real step does.  Prints
microseconds per launch, the KV read rate in TB/s, and the largest difference between the two outputs.
Writes $OUT/decode_tma.json.
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--batches", default="256,192,128,64,16,4")
    args = p.parse_args()
    rows = []
    print("| batch | plain us | TMA us | plain TB/s | TMA TB/s | TMA speed-up | max abs diff |\n|---|---|---|---|---|---|---|")
    for bs in (int(b) for b in args.batches.split(",")):
        q, caches, table, ctx, kv_bytes = batch(bs, args.layers)
        result = {"batch": bs}
        outs = {}
        for name, flag in (("plain", "0"), ("tma", "1")):
            os.environ["NANOVLLM_DECODE_TMA"] = flag
            calls = [lambda k=k, v=v: td.decode_attention_triton(q, k, v, table, ctx, 0.088) for k, v in caches]
            result[f"{name}_us"] = round(graph_us(calls), 2)
            result[f"{name}_tbps"] = round(kv_bytes / result[f"{name}_us"] / 1e6, 3)
            outs[name] = calls[0]().float()
        result["max_abs_diff"] = (outs["plain"] - outs["tma"]).abs().max().item()
        rows.append(result)
        print(f"| {bs} | {result['plain_us']} | {result['tma_us']} | {result['plain_tbps']} | {result['tma_tbps']} | "
              f"{result['plain_us'] / result['tma_us']:.3f} | {result['max_abs_diff']:.2e} |")
        del caches
        torch.cuda.empty_cache()
    os.environ.pop("NANOVLLM_DECODE_TMA")
    write_json("decode_tma.json", rows)


if __name__ == "__main__":
    main()
