"""Where a decode step's GPU time goes, at several running-batch sizes of bench.py's workload (CUDA only).

    python benchmarks/profile_run.py [--model DIR] [--at 256,192,128,64,32,8] [--steps 10]

Runs bench's workload once (after its warm-up) and, the first time the running batch drops to each size in
``--at``, profiles ``--steps`` decode steps (synchronising before and after the window); with ``--prefill``
also all the prefill steps, as one window (printed as batch 0-0, floor 0).  Per window it
prints the wall and GPU-busy milliseconds per step, the byte floor of those steps (weights + KV read at the
measured copy bandwidth), GPU time by kernel category, and the top kernels.  Writes $OUT/profile_run.json.
"""
import argparse
import json
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import copy_bandwidth, workload  # noqa: E402
from nanovllm import LLM, SamplingParams  # noqa: E402
from common import default_model, out_dir  # noqa: E402  (benchmarks/common.py)

CATEGORIES = (("attention", ("_decode", "_prefill", "streamk")),  # our Triton kernels (nanovllm/kernels)
              ("store_kv", ("_store_kv",)),
              ("sampler", ("_gumbel_argmax",)),
              ("matmul", ("_linear_kernel", "nvjet", "gemm", "cutlass", "sm90_", "cublas", "splitK")))


def category(name: str) -> str:
    if "Memset" in name:  # e.g. a library clearing its output or workspace before a kernel
        return "memset"
    if name.startswith("triton_"):  # Inductor's fused kernels: named after the ops they fuse
        return "sampler" if "argmax" in name else "other (fused elementwise / norms / rope)"
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return "other (fused elementwise / norms / rope)"


def kernel_events(prof) -> list[tuple[str, int, int]]:
    """(name, start ns, end ns) of every device kernel and memset the profiler saw."""
    out = []
    for e in prof.profiler.kineto_results.events():
        if e.device_type() == torch.autograd.DeviceType.CUDA and "Memcpy" not in e.name():
            out.append((e.name(), e.start_ns(), e.start_ns() + e.duration_ns()))
    return out


def busy_ns(events) -> int:
    """Length of the union of the kernels' intervals (GPU busy time)."""
    total, end = 0, None
    for _, s, e in sorted(events, key=lambda x: x[1]):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def idle_before(events) -> dict[tuple[str, str], int]:
    """GPU idle ns between consecutive kernels, by (category before, category after): where launches serialise."""
    out, end, prev = {}, None, None
    for name, s, e in sorted(events, key=lambda x: x[1]):
        if end is not None and s > end:
            key = (prev, category(name))
            out[key] = out.get(key, 0) + s - end
        if end is None or e > end:
            end, prev = e, category(name)
    return out


def summarize(events, wall_s: float, steps: int, floor_s: float, batch: list[int]) -> dict:
    by_cat, by_name = {}, {}
    for name, s, e in events:
        by_cat[category(name)] = by_cat.get(category(name), 0) + e - s
        by_name[name] = by_name.get(name, 0) + e - s
    span = (max(e for _, _, e in events) - min(s for _, s, _ in events)) if events else 0
    ms = lambda ns: round(ns / 1e6 / steps, 3)  # noqa: E731
    return {"batch": [min(batch), max(batch)], "steps": steps, "wall_ms": round(1000 * wall_s / steps, 3),
            "kernel_span_ms": ms(span), "gpu_busy_ms": ms(busy_ns(events)),
            "floor_ms": round(1000 * floor_s / steps, 3),
            "kernels_per_step": len(events) // steps,
            "by_category_ms": {k: ms(v) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
            # idle time between kernels inside the window (including between steps), by the pair of categories
            "idle_ms": {f"{a} -> {b}": ms(v)
                        for (a, b), v in sorted(idle_before(events).items(), key=lambda kv: -kv[1])[:8]},
            "top_kernels": [[n[:100], ms(v), sum(1 for x in events if x[0] == n) // steps]
                            for n, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:15]]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--at", default="256,192,128,64,32,8")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--bs", type=int, default=256)
    p.add_argument("--prefill", action="store_true", help="also profile all the prefill steps as one window")
    args = p.parse_args()
    if args.model is None:
        args.model = default_model()
    llm = LLM(args.model, max_num_seqs=args.bs, max_model_len=4096)
    runner = llm.engine.runner
    bandwidth = copy_bandwidth(runner.device)
    weight_bytes = sum(t.numel() * t.element_size() for t in runner.model.parameters())
    kv_per_token = runner.kv_bytes_per_block() // runner.block_size
    targets = sorted((int(x) for x in args.at.split(",")), reverse=True)
    windows, state = [], {"prof": None, "left": 0, "t": 0.0, "floor": 0.0, "batch": []}
    prefill = {"prof": None, "done": False}
    plain_launch = runner.launch

    def launch(batch):
        s = state
        if args.prefill and batch.is_prefill and prefill["prof"] is None and not prefill["done"]:
            torch.cuda.synchronize()  # one window over all the prefill steps
            prefill.update(prof=profile(activities=[ProfilerActivity.CUDA]), t=time.perf_counter(), steps=0)
            prefill["prof"].start()
        if prefill["prof"] is not None and not batch.is_prefill:
            torch.cuda.synchronize()
            wall = time.perf_counter() - prefill["t"]
            prefill["prof"].stop()
            windows.append(dict(summarize(kernel_events(prefill["prof"]), wall, prefill["steps"], 0.0, [0]),
                                kind="prefill"))
            prefill.update(prof=None, done=True)
        if batch.is_prefill and prefill["prof"] is not None:
            prefill["steps"] += 1
        if not batch.is_prefill and s["prof"] is None and targets and len(batch.seqs) <= targets[0]:
            targets.pop(0)
            torch.cuda.synchronize()
            s.update(prof=profile(activities=[ProfilerActivity.CUDA]), left=args.steps, floor=0.0, batch=[])
            s["prof"].start()
            s["t"] = time.perf_counter()
        handle = plain_launch(batch)
        if s["prof"] is not None and not batch.is_prefill:
            s["floor"] += (weight_bytes + kv_per_token * sum(len(q) for q in batch.seqs)) / bandwidth
            s["batch"].append(len(batch.seqs))
            s["left"] -= 1
            if s["left"] == 0:
                torch.cuda.synchronize()
                wall = time.perf_counter() - s["t"]
                s["prof"].stop()
                windows.append(summarize(kernel_events(s["prof"]), wall, args.steps, s["floor"], s["batch"]))
                s["prof"] = None
        return handle

    prompts, params = workload(256, 1024, 1024)
    llm.generate([[1, 2, 3, 4]], SamplingParams(), use_tqdm=False)
    runner.launch = launch
    llm.generate(prompts, params, use_tqdm=False)
    print("| batch | wall ms | GPU busy ms | floor ms | floor/busy | kernels | by category (ms) |\n"
          "|---|---|---|---|---|---|---|")
    for w in windows:
        cats = ", ".join(f"{k} {v}" for k, v in w["by_category_ms"].items())
        print(f"| {w['batch'][0]}-{w['batch'][1]} | {w['wall_ms']} | {w['gpu_busy_ms']} | {w['floor_ms']} | "
              f"{w['floor_ms'] / max(w['gpu_busy_ms'], 1e-9):.0%} | {w['kernels_per_step']} | {cats} |")
    for w in windows:
        where = "the prefill steps" if w.get("kind") == "prefill" else f"batch {w['batch'][1]}"
        print(f"\nGPU idle between kernels at {where} (ms/step): " +
              ", ".join(f"{k} {v}" for k, v in w["idle_ms"].items()))
        print(f"top kernels at {where} (ms/step, calls/step):")
        for name, t, calls in w["top_kernels"]:
            print(f"  {t:8.3f} {calls:4d}  {name}")
    out = out_dir()
    with open(os.path.join(out, "profile_run.json"), "w") as f:
        json.dump(windows, f, indent=1)


if __name__ == "__main__":
    main()
