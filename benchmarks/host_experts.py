"""Could the host compute cold experts instead of copying them (Fiddler's idea)?  On the GPU machine this measures,
for one expert of a given shape (Mixtral-8x7B's by default: hidden 4096, intermediate 14336, bf16):

* the pinned host-to-device copy of its three matrices (what expert offload does on a miss), in GB/s;
* the host computing it for one token (``w2 @ (silu(w1 @ x) * (w3 @ x))`` in torch on every core), in ms and in
  GB/s of weights read, in bf16 and in float32 (float32 weights are twice the bytes);
* the bf16 matmul four ways (``x @ w.T``, ``F.linear``, ``torch.mv``, and the expert cache's own: gate and up
  stacked in one ``x @ w13.T``, the down projection stored transposed, ``act @ w2t``), since the host kernel torch
  picks for one token decides the host's rate;
* what the two give together: a step whose misses are split between copying and host compute in proportion to
  their rates moves the same bytes at the sum of the two rates, so it is at most ``(copy + host) / copy`` times
  faster than copying alone.  A projection, not a measurement of an engine;
* whether they really add up: ``--overlap N`` copies queued on a side stream while the host computes N experts
  (other matrices than the copied ones), timed together, against each alone.  Both read host memory, so a
  shared memory bandwidth shows as a pair slower than the slower of the two alone.

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


def bf16_kernels(w1: torch.Tensor, w3: torch.Tensor, w2: torch.Tensor, reps: int) -> dict:
    """One token through one bf16 expert with four host kernels: best ms and GB/s of weights read."""
    x = torch.randn(1, w1.shape[1], dtype=torch.bfloat16)
    linear = torch.nn.functional.linear
    w13, w2t = torch.cat([w1, w3]), w2.T.contiguous()

    def cache_layout():
        gate, up = (x @ w13.T).chunk(2, dim=-1)
        return (torch.nn.functional.silu(gate) * up) @ w2t

    ways = {"expert cache: x @ w13.T, act @ w2t": cache_layout,
            "x @ w.T": lambda: torch.nn.functional.silu(x @ w1.T) * (x @ w3.T) @ w2.T,
            "F.linear": lambda: linear(torch.nn.functional.silu(linear(x, w1)) * linear(x, w3), w2),
            "torch.mv": lambda: torch.mv(w2, torch.nn.functional.silu(torch.mv(w1, x[0])) * torch.mv(w3, x[0]))}
    nbytes = 3 * w1.numel() * 2
    return {name: {"ms": (s := seconds(fn, reps)) * 1e3, "GB/s": nbytes / s / 1e9} for name, fn in ways.items()}


def overlap(host: torch.Tensor, dev: torch.Tensor, h: int, i: int, n: int) -> dict:
    """n pinned copies of one expert on a side stream, n host experts (bf16, their own matrices), and both at
    once: wall ms of each, and the host's own ms inside the pair."""
    stream = torch.cuda.Stream()
    experts = [(torch.randn(i, h, dtype=torch.bfloat16), torch.randn(i, h, dtype=torch.bfloat16),
                torch.randn(h, i, dtype=torch.bfloat16)) for _ in range(n)]
    x = torch.randn(1, h, dtype=torch.bfloat16)

    def queue_copies():
        with torch.cuda.stream(stream):
            for _ in range(n):
                dev.copy_(host, non_blocking=True)

    def compute():
        for w1, w3, w2 in experts:
            torch.nn.functional.silu(x @ w1.T) * (x @ w3.T) @ w2.T

    def copies():
        queue_copies()
        stream.synchronize()

    host_in_both = []

    def both():
        queue_copies()
        t = time.perf_counter()
        compute()
        host_in_both.append(time.perf_counter() - t)
        stream.synchronize()

    result = {"n": n, "copy_ms": seconds(copies, 2) * 1e3, "host_ms": seconds(compute, 2) * 1e3,
              "both_ms": seconds(both, 2) * 1e3}
    result["host_in_both_ms"] = min(host_in_both) * 1e3
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=14336)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--overlap", type=int, default=8, help="experts copied and computed at once (0: skip)")
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
    result["bf16_kernels"] = bf16_kernels(w1.bfloat16(), w3.bfloat16(), w2.bfloat16(), args.reps)
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
        result["overlap"] = overlap(host, dev, h, i, args.overlap)
    print(json.dumps(result))
    print(f"| host compute bf16 | {out['bfloat16']['ms']:.1f} ms | {out['bfloat16']['GB/s']:.1f} GB/s |")
    print(f"| host compute fp32 | {out['float32']['ms']:.1f} ms | {out['float32']['GB/s']:.1f} GB/s |")
    if "copy" in result:
        print(f"| pinned copy bf16 | {result['copy']['ms']:.1f} ms | {result['copy']['GB/s']:.1f} GB/s |")
        print(f"| bound on copy + host against copy alone | {result['hybrid_speedup_bound']:.2f}x | |")
        o = result["overlap"]
        print(f"| {o['n']} copies alone / {o['n']} host experts alone / both at once | {o['copy_ms']:.1f} ms / "
              f"{o['host_ms']:.1f} ms / {o['both_ms']:.1f} ms (host part {o['host_in_both_ms']:.1f} ms) | |")
    for name, r in result["bf16_kernels"].items():
        print(f"| host bf16 `{name}` | {r['ms']:.1f} ms | {r['GB/s']:.1f} GB/s |")


if __name__ == "__main__":
    main()
