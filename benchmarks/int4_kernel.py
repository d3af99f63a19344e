"""The int4 kernels on a GPU: the w4a16 projection (``nanovllm::linear_int4``) on Qwen3-8B's shapes and the fused
MoE with int4 experts on Qwen3-30B-A3B's, checked against their twins and timed against bf16 and the byte floor.

    python -m benchmarks.int4_kernel [--rows 1,16,64,256] [--tokens 16,256] [--sweep 1,16]
                                                          # writes $OUT/int4_kernel.json

Checks: each op through its CUDA registration against the twin that dequantizes first (relative error < 2e-2,
bf16 activations).  Timing: CUDA-graph replays cycling over four weights per shape (past L2, as consecutive layers
are); ``--sweep`` also times every candidate tile of ``triton_w4a16.py`` (BLOCK_N 32-128, split K 1-16) at those row
counts beside the dispatched one, the data ``w4a16_config``'s tiles come from; ``floor`` is the int4 bytes (packed
codes, float16 scales, uint8 zeros, group 128) at the copy bandwidth; ``bf16`` is cuBLAS (projections) or the fused MoE (experts) over the same weights in bf16.  Exits non-zero if a
check fails.
"""
import argparse
import sys

import torch

from benchmarks.common import copy_bandwidth, graph_us, write_json
from nanovllm.kernels import int4_quant, moe_reference, ops, reference
from nanovllm.kernels.matmul_configs import MatmulConfig

GROUP = 128
SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}  # Qwen3-8B
MOE = (128, 8, 2048, 768)  # Qwen3-30B-A3B: experts, top-k, hidden, intermediate


def rel_err(got, want) -> float:
    return ((got.float() - want.float()).norm() / want.float().norm()).item()


def projections(rows: list[int], bandwidth: float, table: list) -> list[dict]:
    out = []
    for name, (n, k) in SHAPES.items():
        silu = name == "gate_up"
        dense = [torch.randn(n, k, device="cuda") / k ** 0.5 for _ in range(4)]
        packed = [int4_quant.quantize(w, GROUP) for w in dense]
        bf16 = [w.bfloat16() for w in dense]
        nbytes = n * k // 2 + 3 * n * int4_quant.num_groups(k, GROUP)
        for m in rows:
            x = torch.randn(m, k, device="cuda").bfloat16()
            got = ops.linear_int4(x, *packed[0], GROUP, silu_mul=silu)
            want = reference.linear_int4_reference(x, *packed[0], GROUP, None, None, silu)
            err = rel_err(got, want)
            us = graph_us([lambda p=p: ops.linear_int4(x, *p, GROUP, silu_mul=silu) for p in packed])
            base = graph_us([lambda w=w: ops.linear(x, w, None, silu) for w in bf16])
            row = dict(op=name, rows=m, err=err, us=us, bf16_us=base, floor_us=nbytes / bandwidth * 1e6)
            out.append(row)
            table.append(f"| {name} | {m} | {us:.1f} | {base:.1f} | {row['floor_us']:.1f} | {err:.1e} |")
    return out


def sweep(rows: list[int], table: list) -> list[dict]:
    """Each candidate tile on each projection shape at each row count (microseconds), the dispatched one marked."""
    from nanovllm.kernels.triton_common import _num_sms
    from nanovllm.kernels.triton_w4a16 import fits, linear_w4a16_triton, w4a16_config
    out = []
    for name, (n, k) in SHAPES.items():
        silu = name == "gate_up"
        packed = [int4_quant.quantize(torch.randn(n, k, device="cuda") / k ** 0.5, GROUP) for _ in range(4)]
        n_out = n // 2 if silu else n
        for m in rows:
            x = torch.randn(m, k, device="cuda").bfloat16()
            picked = w4a16_config(m, n_out, k, GROUP, _num_sms(x.device))
            times = {}
            for cfg in (MatmulConfig(16 if m <= 16 else 64, bn, 128, split_k=s) for bn in (32, 64, 128)
                        for s in (1, 2, 4, 8, 16)):
                if fits(cfg, k, GROUP):
                    times[cfg] = graph_us([lambda p=p, c=cfg: linear_w4a16_triton(x, *p, GROUP, None, None, c, silu)
                                           for p in packed])
            best = min(times, key=times.get)
            row = dict(op=name, rows=m, best=str(best), best_us=times[best], picked=str(picked),
                       picked_us=times.get(picked), all={str(c): t for c, t in times.items()})
            out.append(row)
            table.append(f"| {name} | {m} | {best.block_n}x{best.split_k}: {times[best]:.1f} | "
                         f"{picked.block_n}x{picked.split_k}: {times.get(picked, float('nan')):.1f} |")
    return out


def experts(tokens: list[int], bandwidth: float, table: list) -> list[dict]:
    e, top_k, h, i = MOE
    w13 = torch.randn(e, 2 * i, h, device="cuda") / h ** 0.5
    w2 = torch.randn(e, h, i, device="cuda") / i ** 0.5
    (q13, s13, z13), (q2, s2, z2) = int4_quant.quantize(w13, GROUP), int4_quant.quantize(w2, GROUP)
    b13, b2 = w13.bfloat16(), w2.bfloat16()
    out = []
    for t in tokens:
        x, logits = torch.randn(t, h, device="cuda").bfloat16(), torch.randn(t, e, device="cuda").bfloat16()
        got = ops.fused_moe(x, logits, q13, q2, top_k, True, s13, s2, GROUP, w13_zero=z13, w2_zero=z2)
        want = moe_reference.fused_moe_reference(x, logits, q13, q2, top_k, True, s13, s2, GROUP, z13, z2)
        err = rel_err(got, want)
        touched = int(torch.unique(moe_reference.route_reference(logits, top_k, True)[1]).numel())
        nbytes = touched * 3 * i * h // 2 * (1 + 3 * 2 / GROUP)
        us = graph_us([lambda: ops.fused_moe(x, logits, q13, q2, top_k, True, s13, s2, GROUP, w13_zero=z13,
                                             w2_zero=z2)])
        base = graph_us([lambda: ops.fused_moe(x, logits, b13, b2, top_k, True)])
        row = dict(op="moe", rows=t, err=err, us=us, bf16_us=base, floor_us=nbytes / bandwidth * 1e6)
        out.append(row)
        table.append(f"| moe | {t} | {us:.1f} | {base:.1f} | {row['floor_us']:.1f} | {err:.1e} |")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,16,64,256", help="projection row counts")
    p.add_argument("--tokens", default="16,256", help="MoE token counts")
    p.add_argument("--sweep", default="", help="row counts at which to time every candidate tile (e.g. 1,16)")
    args = p.parse_args()
    from nanovllm.kernels.cuda import register_cuda_kernels
    register_cuda_kernels()
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()  # bytes read + written per second, as every floor in docs/PERFORMANCE.md
    table = ["| op | rows | int4 us | bf16 us | floor us | rel err |", "|---|---|---|---|---|---|"]
    rows = projections([int(r) for r in args.rows.split(",")], bandwidth, table)
    rows += experts([int(t) for t in args.tokens.split(",")], bandwidth, table)
    print("\n".join(table))
    tiles = ["| op | rows | best tile (BLOCK_N x split): us | dispatched: us |", "|---|---|---|---|"]
    swept = sweep([int(r) for r in args.sweep.split(",")], tiles) if args.sweep else []
    print("\n".join(tiles if swept else []))
    failed = [r for r in rows if not r["err"] < 2e-2]
    write_json("int4_kernel.json", {"device": torch.cuda.get_device_name(), "rows": rows, "failed": failed,
                                    "sweep": swept})
    print(f"checks: {len(rows) - len(failed)}/{len(rows)} ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
