"""Could the host compute cold experts instead of copying them (Fiddler's idea)?  On the GPU machine this measures,
for one expert of a given shape (Mixtral-8x7B's by default: hidden 4096, intermediate 14336, bf16):

* the pinned host-to-device copy of its three matrices (what expert offload does on a miss), in GB/s;
* the host computing it for one token (``w2 @ (silu(w1 @ x) * (w3 @ x))`` in torch on every core), in ms and in
  GB/s of weights read, in bf16 and in float32 (float32 weights are twice the bytes);
* what the two give together: a step whose misses are split between copying and host compute in proportion to
  their rates moves the same bytes at the sum of the two rates, so it is at most ``(copy + host) / copy`` times
  faster than copying alone.  A projection, not a measurement of an engine.

    python benchmarks/host_experts.py [--hidden 4096 --intermediate 14336] [--threads N]
"""
import argparse
import json
import os
import time

import torch


def seconds(fn, reps: int) -> float:
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    h, i = args.hidden, args.intermediate
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    model = next((line.split(":", 1)[1].strip() for line in flags.splitlines() if line.startswith("model name")), "?")
    result = {"cpu": model, "threads": args.threads, "amx_bf16": " amx_bf16" in flags,
              "avx512_bf16": " avx512_bf16" in flags, "expert_bytes_bf16": 3 * h * i * 2}
    out = {}
    for dtype in (torch.bfloat16, torch.float32):
        w1, w3, w2 = torch.randn(i, h, dtype=dtype), torch.randn(i, h, dtype=dtype), torch.randn(h, i, dtype=dtype)
        x = torch.randn(1, h, dtype=dtype)

        def expert():
            return torch.nn.functional.silu(x @ w1.T) * (x @ w3.T) @ w2.T

        s = seconds(expert, args.reps)
        nbytes = 3 * h * i * w1.element_size()
        out[str(dtype).split(".")[1]] = {"ms": s * 1e3, "GB/s": nbytes / s / 1e9}
    result["host_compute"] = out
    if torch.cuda.is_available():
        host = torch.empty(3 * h * i, dtype=torch.bfloat16).pin_memory()
        dev = torch.empty_like(host, device="cuda")

        def copy():
            dev.copy_(host, non_blocking=True)
            torch.cuda.synchronize()

        s = seconds(copy, args.reps)
        result["copy"] = {"ms": s * 1e3, "GB/s": host.numel() * 2 / s / 1e9}
        host_rate = out["bfloat16"]["GB/s"]
        result["hybrid_speedup_bound"] = (result["copy"]["GB/s"] + host_rate) / result["copy"]["GB/s"]
    print(json.dumps(result))
    print(f"| host compute bf16 | {out['bfloat16']['ms']:.1f} ms | {out['bfloat16']['GB/s']:.1f} GB/s |")
    print(f"| host compute fp32 | {out['float32']['ms']:.1f} ms | {out['float32']['GB/s']:.1f} GB/s |")
    if "copy" in result:
        print(f"| pinned copy bf16 | {result['copy']['ms']:.1f} ms | {result['copy']['GB/s']:.1f} GB/s |")
        print(f"| bound on copy + host against copy alone | {result['hybrid_speedup_bound']:.2f}x | |")


if __name__ == "__main__":
    main()
