"""The int4 kernels on a GPU (``python -m benchmarks.kernel_bench --int4``), checked against their twins.

The w4a16 projection on Qwen3-8B's shapes and the fused MoE with int4 experts on Qwen3-30B-A3B's, each checked
against its twin (relative error < 2e-2; exit 1 otherwise), timed as CUDA-graph replays over four weights cycled,
beside bf16 and the int4 byte floor; writes $OUT/int4_kernel.json.  ``--sweep ROWS`` also times every candidate
configuration at those row counts: the tiled Triton kernel's (BLOCK_N 32-128, split K 1-16, 2 or 4 stages), the
dispatched one marked, and at one row the CUDA C++ kernel's rows per warp.
"""
import torch

from benchmarks.common import copy_bandwidth, graph_us, positive_ints, rel_err, write_json
from nanovllm.kernels import int4_quant, moe_reference, ops, reference
from nanovllm.kernels.matmul_configs import MatmulConfig

INT4_GROUP = 128
INT4_SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}  # Qwen3-8B
INT4_MOE = (128, 8, 2048, 768)  # Qwen3-30B-A3B: experts, top-k, hidden, intermediate


def int4_projections(rows: list[int], bandwidth: float, table: list) -> list[dict]:
    out = []
    for name, (n, k) in INT4_SHAPES.items():
        silu = name == "gate_up"
        dense = [torch.randn(n, k, device="cuda") / k ** 0.5 for _ in range(4)]
        packed = [int4_quant.quantize(w, INT4_GROUP) for w in dense]
        bf16 = [w.bfloat16() for w in dense]
        nbytes = n * k // 2 + 3 * n * int4_quant.num_groups(k, INT4_GROUP)
        for m in rows:
            x = torch.randn(m, k, device="cuda").bfloat16()
            got = ops.linear_int4(x, *packed[0], INT4_GROUP, silu_mul=silu)
            want = reference.linear_int4_reference(x, *packed[0], INT4_GROUP, None, None, silu)
            err = rel_err(got, want)
            us = graph_us([lambda p=p: ops.linear_int4(x, *p, INT4_GROUP, silu_mul=silu) for p in packed])
            base = graph_us([lambda w=w: ops.linear(x, w, None, silu) for w in bf16])
            row = dict(op=name, rows=m, err=err, us=us, bf16_us=base, floor_us=nbytes / bandwidth * 1e6)
            out.append(row)
            table.append(f"| {name} | {m} | {us:.1f} | {base:.1f} | {row['floor_us']:.1f} | {err:.1e} |")
    return out


def sweep_candidates(m: int, k: int) -> list[MatmulConfig]:
    """The tiled kernel's configurations ``--sweep`` times at ``m`` rows."""
    from nanovllm.kernels.triton_w4a16 import fits
    return [c for c in (MatmulConfig(16 if m <= 16 else 32 if m <= 32 else 64, bn, 128, split_k=s, num_stages=st)
                        for bn in (32, 64, 128) for s in (1, 2, 4, 8, 16) for st in (2, 4)) if fits(c, k, INT4_GROUP)]


def int4_sweep(rows: list[int], table: list) -> list[dict]:
    """Each candidate configuration on each projection shape at each row count (microseconds), the dispatched one
    marked; at one row also the CUDA C++ kernel at each rows-per-warp (where nvcc built it)."""
    from nanovllm.kernels import cuda_w4a16
    from nanovllm.kernels.triton_common import _num_sms
    from nanovllm.kernels.triton_w4a16 import linear_w4a16_triton, w4a16_config
    out = []
    for name, (n, k) in INT4_SHAPES.items():
        silu = name == "gate_up"
        packed = [int4_quant.quantize(torch.randn(n, k, device="cuda") / k ** 0.5, INT4_GROUP) for _ in range(4)]
        n_out = n // 2 if silu else n
        for m in rows:
            x = torch.randn(m, k, device="cuda").bfloat16()
            picked = w4a16_config(m, n_out, k, INT4_GROUP, _num_sms(x.device))
            times = {_short(cfg): graph_us([lambda p=p, c=cfg: linear_w4a16_triton(x, *p, INT4_GROUP, None, None, c,
                                                                                   silu) for p in packed])
                     for cfg in sweep_candidates(m, k)}
            if cuda_w4a16.usable(x, *packed[0], INT4_GROUP):
                want = reference.linear_int4_reference(x, *packed[0], INT4_GROUP, None, None, silu)
                for r in ((2, 4) if silu else (1, 2, 4)):
                    err = rel_err(cuda_w4a16.linear_w4a16_gemv_cuda(x, *packed[0], INT4_GROUP, None, None, silu, r),
                                  want)
                    times[f"cuda rows {r} (err {err:.1e})"] = graph_us([
                        lambda p=p, r=r: cuda_w4a16.linear_w4a16_gemv_cuda(x, *p, INT4_GROUP, None, None, silu, r)
                        for p in packed])
            best = min(times, key=times.get)
            row = dict(op=name, rows=m, best=best, best_us=times[best], picked=_short(picked),
                       picked_us=times.get(_short(picked)), all=times)
            out.append(row)
            table.append(f"| {name} | {m} | {best}: {times[best]:.1f} | "
                         f"{_short(picked)}: {times.get(_short(picked), float('nan')):.1f} |")
    return out


def _short(cfg: MatmulConfig) -> str:
    return f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} split {cfg.split_k} s{cfg.num_stages} w{cfg.num_warps}"


def int4_experts(tokens: list[int], bandwidth: float, table: list) -> list[dict]:
    e, top_k, h, i = INT4_MOE
    w13 = torch.randn(e, 2 * i, h, device="cuda") / h ** 0.5
    w2 = torch.randn(e, h, i, device="cuda") / i ** 0.5
    (q13, s13, z13), (q2, s2, z2) = int4_quant.quantize(w13, INT4_GROUP), int4_quant.quantize(w2, INT4_GROUP)
    b13, b2 = w13.bfloat16(), w2.bfloat16()
    out = []
    for t in tokens:
        x, logits = torch.randn(t, h, device="cuda").bfloat16(), torch.randn(t, e, device="cuda").bfloat16()
        got = ops.fused_moe(x, logits, q13, q2, top_k, True, s13, s2, INT4_GROUP, w13_zero=z13, w2_zero=z2)
        want = moe_reference.fused_moe_reference(x, logits, q13, q2, top_k, True, s13, s2, INT4_GROUP, z13, z2)
        err = rel_err(got, want)
        touched = int(torch.unique(moe_reference.route_reference(logits, top_k, True)[1]).numel())
        nbytes = touched * 3 * i * h // 2 * (1 + 3 * 2 / INT4_GROUP)
        us = graph_us([lambda: ops.fused_moe(x, logits, q13, q2, top_k, True, s13, s2, INT4_GROUP, w13_zero=z13,
                                             w2_zero=z2)])
        base = graph_us([lambda: ops.fused_moe(x, logits, b13, b2, top_k, True)])
        row = dict(op="moe", rows=t, err=err, us=us, bf16_us=base, floor_us=nbytes / bandwidth * 1e6)
        out.append(row)
        table.append(f"| moe | {t} | {us:.1f} | {base:.1f} | {row['floor_us']:.1f} | {err:.1e} |")
    return out


def int4_main(args) -> int:
    """``--int4``: the int4 checks and timings (and ``--sweep``), written to $OUT/int4_kernel.json."""
    from nanovllm.kernels.cuda import register_cuda_kernels
    register_cuda_kernels()
    torch.manual_seed(0)
    bandwidth = copy_bandwidth()  # bytes read + written per second, as every floor in docs/PERFORMANCE.md
    table = ["| op | rows | int4 us | bf16 us | floor us | rel err |", "|---|---|---|---|---|---|"]
    rows = int4_projections(positive_ints(args.rows, "--rows"), bandwidth, table)
    rows += int4_experts(positive_ints(args.tokens, "--tokens"), bandwidth, table)
    print("\n".join(table))
    tiles = ["| op | rows | best (rows x BLOCK_N x BLOCK_K, split, stages, warps): us | dispatched: us |",
             "|---|---|---|---|"]
    swept = int4_sweep(positive_ints(args.sweep, "--sweep"), tiles) if args.sweep else []
    print("\n".join(tiles if swept else []))
    failed = [r for r in rows if not r["err"] < 2e-2]
    write_json("int4_kernel.json", {"device": torch.cuda.get_device_name(), "rows": rows, "failed": failed,
                                    "sweep": swept})
    print(f"checks: {len(rows) - len(failed)}/{len(rows)} ok")
    return 1 if failed else 0
