"""Memory bandwidth ceilings of this GPU: copy (read + write), write-only and read-only, in TB/s.

    python benchmarks/bandwidth.py            # prints a table, writes $OUT/bandwidth.json

The byte floor of docs/PERFORMANCE.md divides by the copy bandwidth; decode attention only reads, so the
read-only ceiling (a Triton streaming sum over a 4 GiB buffer, best of a few launch shapes) says how much
headroom a kernel at "100% of copy bandwidth" still has.
"""
import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import write_json  # noqa: E402


@triton.jit
def _read_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    step = tl.num_programs(0) * BLOCK
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(pid * BLOCK, n, step):
        acc += tl.load(x_ptr + start + tl.arange(0, BLOCK)).to(tl.float32)
    tl.store(out_ptr + pid, tl.sum(acc, 0))


def timed(fn, reps=10) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1000 / reps


def main():
    n = 1 << 31  # 4 GiB of bf16
    a = torch.empty(n, dtype=torch.bfloat16, device="cuda").normal_()
    b = torch.empty_like(a)
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    rows = [{"kind": "copy (read + write)", "tb_s": 2 * a.nbytes / timed(lambda: b.copy_(a)) / 1e12},
            {"kind": "write (fill)", "tb_s": a.nbytes / timed(lambda: b.fill_(1.0)) / 1e12},
            {"kind": "read (torch.sum)", "tb_s": a.nbytes / timed(lambda: a.sum(dtype=torch.float32)) / 1e12}]
    for per_sm in (2, 4, 8, 16):
        for block, warps in ((2048, 4), (4096, 8), (8192, 8)):
            out = torch.empty(sms * per_sm, dtype=torch.float32, device="cuda")
            s = timed(lambda: _read_kernel[(sms * per_sm,)](a, out, n, BLOCK=block, num_warps=warps))
            kind = f"read (Triton, {per_sm}/SM, block {block}, {warps} warps)"
            rows.append({"kind": kind, "tb_s": a.nbytes / s / 1e12})
    print(f"{torch.cuda.get_device_name()}\n| kind | TB/s |\n|---|---|")
    for r in rows:
        r["tb_s"] = round(r["tb_s"], 3)
        print(f"| {r['kind']} | {r['tb_s']:.3f} |")
    write_json("bandwidth.json", {"device": torch.cuda.get_device_name(), "rows": rows})


if __name__ == "__main__":
    main()
