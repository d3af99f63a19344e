"""Decode step time per bucket, eager against graph, beside the step's byte floor (run on a GPU).

    python benchmarks/decode_buckets.py [--model DIR] [--context 1024] [--buckets 1,16,64,256]

For every bucket, ``bucket`` sequences of ``--context`` tokens decode one token; the floor is the bytes the
step must read (weights + each sequence's KV) over the measured device-to-device copy bandwidth.  Also
reports the time to compile and capture all buckets.  Writes JSON and a markdown table to $OUT (or ./results).
"""
import argparse
import json
import os
import time

import torch

from nanovllm import LLM, SamplingParams
from nanovllm.compile.executor import EagerExecutor
from nanovllm.engine.sequence import Sequence
from common import default_model, out_dir as results_dir  # noqa: E402  (benchmarks/common.py)


def copy_bandwidth() -> float:
    """Bytes read + written per second by a large device-to-device copy."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    for _ in range(3):
        b.copy_(a)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        b.copy_(a)
    end.record()
    torch.cuda.synchronize()
    return 2 * a.numel() * 20 / (start.elapsed_time(end) / 1000)


def time_decode(runner, executor, seqs, rows, iters=20) -> float:
    inputs = runner.prepare_decode(seqs, rows)
    for _ in range(3):
        executor.decode(inputs, rows)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        executor.decode(inputs, rows)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / iters


def profile_largest(runner, graph_exec, bucket, context, blocks_per_seq) -> list:
    """GPU time per kernel of the compiled decode step (run without its CUDA graph so kernels are visible)."""
    seqs = []
    for i in range(bucket):
        s = Sequence(i, [1] * context, SamplingParams(temperature=0.6), seed=i)
        s.block_table = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
        seqs.append(s)
    rows = graph_exec.padded_rows(bucket)
    inputs = runner.prepare_decode(seqs, rows)
    step = graph_exec.graphs[rows].compiled_step
    with torch.inference_mode():
        for _ in range(3):
            step(inputs)
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                step(inputs)
            torch.cuda.synchronize()
    events = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:12]
    top = [{"kernel": e.key[:90], "ms_per_step": e.device_time_total / 5 / 1e3, "calls_per_step": e.count / 5}
           for e in events]
    print("top kernels per decode step (bucket %d, context %d):" % (bucket, context))
    for t in top:
        print(f"  {t['ms_per_step']:.3f} ms  x{t['calls_per_step']:.0f}  {t['kernel']}")
    return top


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--buckets", default=None, help="buckets to time (default: all compiled ones)")
    args = p.parse_args()
    if args.model is None:
        args.model = default_model()
    out_dir = results_dir()
    t = time.perf_counter()
    llm = LLM(args.model, max_model_len=4096)
    init_seconds = time.perf_counter() - t
    runner = llm.engine.runner
    graph_exec, eager_exec = runner.executor, EagerExecutor(runner)
    buckets = [int(b) for b in args.buckets.split(",")] if args.buckets else list(llm.config.graph_batch_sizes)
    bw = copy_bandwidth()
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
    kv_per_token = runner.kv_bytes_per_block() // runner.block_size
    blocks_per_seq = -(-(args.context + 1) // runner.block_size)
    rows = []
    for b in buckets:
        seqs = []
        for i in range(b):
            s = Sequence(i, [1] * args.context, SamplingParams(temperature=0.6), seed=i)
            s.block_table = list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq))
            seqs.append(s)
        graph_s = time_decode(runner, graph_exec, seqs, graph_exec.padded_rows(b))
        eager_s = time_decode(runner, eager_exec, seqs, b)
        floor = (weight_bytes + b * args.context * kv_per_token) / bw
        rows.append({"bucket": b, "context": args.context, "eager_ms": eager_s * 1e3, "graph_ms": graph_s * 1e3,
                     "speedup": eager_s / graph_s, "floor_ms": floor * 1e3, "graph_vs_floor": floor / graph_s})
    result = {"model": args.model, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "copy_bandwidth_GBps": bw / 1e9, "init_seconds": init_seconds,
              "compile_seconds": getattr(graph_exec, "compile_seconds", None), "rows": rows}
    result["profile_top_kernels"] = profile_largest(runner, graph_exec, max(buckets), args.context, blocks_per_seq)
    with open(os.path.join(out_dir, "decode_buckets.json"), "w") as f:
        json.dump(result, f, indent=2)
    lines = [f"copy bandwidth {bw / 1e9:.0f} GB/s; init {init_seconds:.1f}s "
             f"(compile+capture {result['compile_seconds']:.1f}s)", "",
             "| bucket | eager ms | graph ms | graph/eager speedup | floor ms | floor/graph |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['bucket']} | {r['eager_ms']:.2f} | {r['graph_ms']:.2f} | {r['speedup']:.2f}x | "
              f"{r['floor_ms']:.2f} | {r['graph_vs_floor']:.0%} |" for r in rows]
    table = "\n".join(lines)
    with open(os.path.join(out_dir, "decode_buckets.md"), "w") as f:
        f.write(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
