"""Tune the decode matmuls: every candidate Triton configuration against cuBLAS, per weight shape and bucket.

    python -m benchmarks.matmul_sweep                      # Qwen3-0.6B shapes, the default decode buckets
    python -m benchmarks.matmul_sweep --preset llama-3.2-1b --buckets 2,8,64,256
    python -m benchmarks.matmul_sweep --fp8 --group 128 --preset qwen3-30b-a3b --shapes qkv,o   # FP8 weights
    python -m benchmarks.matmul_sweep ... --tp 2                    # the shapes one of two ranks holds

For each projection of the model (qkv, o, gate/up with the fused SiLU-and-multiply, down, LM head) and each
batch size, it checks every candidate against ``F.linear`` (relative error < 1e-2) and times it as the engine
runs it: a CUDA graph of one launch per layer, each on its own weight tensor (so nothing is served from L2
that a real step would read from memory), replayed.  The baseline is cuBLAS (``F.linear``; for gate/up plus
the unfused SiLU-and-multiply kernel).  A Triton config enters the table only where it beats the baseline by
``--margin``.  ``--fp8`` sweeps FP8 weights (``weight_quant.quantize``, ``--group`` columns per scale, 0: one per
row) against the large-M path they replace (dequantize + cuBLAS), swapped tiles among the candidates, and writes
rows under the FP8 key; up to 8 rows it also times the CUDA C++ kernel (``cuda_w8a16``, which the engine runs there
when built) and each row gives the weight bytes' time at the copy bandwidth (``floor_us``).  Writes all timings
to ``$OUT/matmul_sweep.json`` and the winners into the dispatch table (``nanovllm/kernels/matmul_tuned.json`` by
default, merged under this GPU's compute capability: a swept batch size replaces its row, the rows of other batch
sizes stay).  ``--margin -1`` takes the best Triton config everywhere, for an end-to-end comparison with cuBLAS
(``NANOVLLM_MATMUL_TABLE=... python bench.py``).
"""
import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from benchmarks.common import copy_bandwidth, graph_us, positive_ints, write_json
from nanovllm.graph_sizes import DEFAULT_GRAPH_BATCH_SIZES
from nanovllm.kernels import cuda_w8a16, weight_quant
from nanovllm.kernels.matmul_configs import TABLE_PATH, MatmulConfig, _arch, fp8_config, table_key
from nanovllm.kernels.reference import linear_reference
from nanovllm.kernels.triton_common import _num_sms
from nanovllm.kernels.triton_matmul import dequantize_triton, linear_triton, silu_mul_triton


def model_shapes(fields: dict, tp: int = 1) -> dict[str, tuple[int, int, int, bool]]:
    """name -> (weight rows N, K, layers, silu_mul) of every decode projection, as one of ``tp`` ranks holds it
    (column-parallel qkv, gate/up and LM head split N; row-parallel o and down split K)."""
    h, layers = fields["hidden_size"], fields["num_hidden_layers"]
    heads = fields["num_attention_heads"]
    d = fields.get("head_dim") or h // heads
    q, kv, inter = heads * d, fields["num_key_value_heads"] * d, fields["intermediate_size"]
    return {"qkv": ((q + 2 * kv) // tp, h, layers, False), "o": (h, q // tp, layers, False),
            "gate_up": (2 * inter // tp, h, layers, True), "down": (h, inter // tp, layers, False),
            "lm_head": (fields["vocab_size"] // tp, h, 4, False)}


def candidates(m: int) -> list[MatmulConfig]:
    """Configs worth timing at batch m: M tiles near m, narrow N tiles and split K for the small batches."""
    block_ms = (16,) if m <= 16 else (16, 32) if m <= 32 else (32, 64) if m <= 64 else (64, 128)
    out = []
    for bm in block_ms:
        if bm <= 32:
            for bn in (32, 64, 128):
                for bk, stages in ((128, 4), (256, 3)):
                    for split in (1, 2, 4):
                        out.append(MatmulConfig(bm, bn, bk, split, False, 4, stages))
            for bk, split in ((128, 1), (256, 1), (256, 2), (128, 4)):
                out.append(MatmulConfig(bm, 64, bk, split, True, 4, 4 if bk == 128 else 3))
        else:
            for bn in (64, 128):
                for bk in (64, 128):
                    for split in (1, 2):
                        for warps in ((4, 8) if bn == 128 else (4,)):
                            out.append(MatmulConfig(bm, bn, bk, split, False, warps, 4 if bk == 64 else 3))
    return out


def fp8_candidates(m: int, n_out: int, k: int, group: int) -> list[MatmulConfig]:
    """FP8 configs worth timing at batch m: the built-in tiles (``fp8_config``, up to 64 rows), swapped tiles with
    M tiles near m, and unswapped ones past 64 rows."""
    out = [fp8_config(m, n_out, k, group, _num_sms(torch.device("cuda")))] if m <= 64 else []
    block_ms = (max(16, 1 << (m - 1).bit_length()),) if m <= 64 else (64, 128) if m <= 128 else (64, 128, 256)
    for bm in block_ms:
        for bn in (64, 128):
            for warps, stages in ((8, 3),) if bm == 256 else ((4, 3), (4, 4), (8, 3)):
                for split in (1, 2) if m <= 64 else (1,):
                    out.append(MatmulConfig(bm, bn, 128, split, True, warps, stages))
    if m > 64:
        out += [MatmulConfig(bm, bn, 128, 1, False, w, 3) for bm in (64, 128) for bn in (64, 128) for w in (4, 8)]
    return [c for c in out if c is not None]


def sweep_shape(name, n, k, layers, silu, buckets, dtype, margin, log, group=None, bandwidth=None):
    """Time the candidates of one weight shape at each batch size; with ``group`` (FP8 weights, columns per scale)
    the FP8 kernel against dequantize + cuBLAS."""
    copies = layers if n * k < 1 << 26 else 1  # the LM head is larger than L2 on its own
    weights = [torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5 for _ in range(copies)]
    fp8 = group is not None
    if fp8:
        group = group or k
        weights = [weight_quant.quantize(w, group) for w in weights]
    n_out = n // 2 if silu else n
    rows, table = [], []
    for m in buckets:
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        want = linear_reference(x.float(), weights[0][0], None, silu, weights[0][1], group) if fp8 else \
            linear_reference(x.float(), weights[0].float(), None, silu)

        def baseline(w):
            y = F.linear(x, dequantize_triton(*w, group, x.dtype) if fp8 else w)
            return silu_mul_triton(y) if silu else y

        def triton(w, cfg):
            return linear_triton(x, w[0], None, cfg, silu, w[1], group) if fp8 else linear_triton(x, w, None, cfg, silu)
        per_layer = [weights[i % len(weights)] for i in range(layers)]
        base_us = graph_us([lambda w=w: baseline(w) for w in per_layer])
        results = []
        for cfg in fp8_candidates(m, n_out, k, group) if fp8 else candidates(m):
            if not (cfg.fits_fp8(k, group) if fp8 else cfg.fits(m, n_out, k)):
                continue
            try:
                got = triton(weights[0], cfg)
                err = ((got.float() - want).norm() / want.norm()).item()
                if not err < 1e-2:
                    log(f"  {name} m={m} {cfg}: WRONG (relative error {err:.2e})")
                    continue
                us = graph_us([lambda w=w, c=cfg: triton(w, c) for w in per_layer])
            except Exception as e:  # e.g. out of shared memory: the config is not a candidate here
                log(f"  {name} m={m} {cfg}: {type(e).__name__}: {str(e)[:80]}")
                continue
            results.append((us, cfg))
        results.sort(key=lambda r: r[0])
        best_us, best = results[0] if results else (float("inf"), None)
        extra = {}
        if fp8 and cuda_w8a16.usable(x, *weights[0], group):  # the few-row kernel the engine takes first
            err = ((cuda_w8a16.linear_w8a16_cuda(x, *weights[0], group, None, silu).float() - want).norm()
                   / want.norm()).item()
            extra["cuda_us"] = round(graph_us([lambda w=w: cuda_w8a16.linear_w8a16_cuda(x, *w, group, None, silu)
                                               for w in per_layer]), 2) if err < 1e-2 else f"WRONG {err:.2e}"
        if fp8 and bandwidth:  # the weight's bytes (one a code, four a scale) read once at the copy bandwidth
            extra["floor_us"] = round(n * (k + 4 * -(-k // group)) / bandwidth * 1e6, 2)
        win = best is not None and best_us < base_us * (1 - margin)
        table.append([m, vars(best) if win else None])
        rows.append({"shape": name, "n_out": n_out, "k": k, "m": m, "cublas_us": round(base_us, 2),
                     "best_us": round(best_us, 2), "best": vars(best) if best else None,
                     "chosen": "triton" if win else "cublas",
                     "top": [[round(us, 2), vars(c)] for us, c in results[:5]], **extra})
        log(f"| {name} | {m} | {base_us:.1f} | {best_us:.1f} | {base_us / best_us:.2f}x | {best} |"
            + "".join(f" {key} {value} |" for key, value in extra.items()))
    return rows, table_key(n_out, k, silu, group if fp8 else None), table


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3-0.6b", help="a preset of nanovllm.tools.synthesize")
    p.add_argument("--buckets", default=",".join(str(max(2, b)) for b in DEFAULT_GRAPH_BATCH_SIZES))
    p.add_argument("--shapes", help="default: gate_up,down,qkv,o and, without --fp8, lm_head (kept in bf16)")
    p.add_argument("--margin", type=float, default=0.03, help="required speed-up over cuBLAS (fraction)")
    p.add_argument("--table", default=str(TABLE_PATH), help="dispatch table to merge the winners into")
    p.add_argument("--fp8", action="store_true", help="FP8 weights (weight_quant.py) against dequantize + cuBLAS")
    p.add_argument("--group", type=int, default=0, help="with --fp8: columns per scale (0: one per row)")
    p.add_argument("--tp", type=int, default=1, help="the shapes one of this many tensor-parallel ranks holds")
    args = p.parse_args()
    from nanovllm.tools.synthesize import PRESETS
    shapes = model_shapes(PRESETS[args.preset]["fields"], args.tp)
    buckets = sorted(set(positive_ints(args.buckets, "--buckets")))
    dtype = torch.bfloat16
    arch = _arch(torch.device("cuda"))  # the key the dispatch table is read under
    weights = f"FP8 weights, groups of {args.group or 'a row'}" if args.fp8 else "bf16 weights"
    print(f"{torch.cuda.get_device_name()} (sm {arch}), {args.preset} (a rank of {args.tp}), {weights}, "
          f"buckets {buckets}")
    base = "dequantize + cuBLAS" if args.fp8 else "cuBLAS"
    print(f"| shape | m | {base} us | Triton us | speed-up | best config |\n|---|---|---|---|---|---|", flush=True)
    all_rows, tuned = [], {}
    bandwidth = copy_bandwidth() if args.fp8 else None  # for the FP8 rows' floors
    start = time.perf_counter()
    names = args.shapes or "gate_up,down,qkv,o" + ("" if args.fp8 else ",lm_head")
    for name in names.split(","):  # results are saved after every shape, so a cut-off run keeps them
        n, k, layers, silu = shapes[name]
        rows, key, table = sweep_shape(name, n, k, layers, silu, buckets, dtype, args.margin,
                                       lambda s: print(s, flush=True), args.group if args.fp8 else None, bandwidth)
        all_rows += rows
        tuned[key] = table
        write_json("matmul_sweep.json", {"device": torch.cuda.get_device_name(), "arch": arch,
                                         "preset": args.preset, "tp": args.tp,
                                         "fp8_group": args.group if args.fp8 else None,
                                         "seconds": round(time.perf_counter() - start, 1),
                                         "rows": all_rows})
        merge_table(args.table, arch, {key: table})
    print(f"table: {args.table} ({len(tuned)} shapes for sm {arch}), sweep {time.perf_counter() - start:.0f}s")


def merge_table(path: str, arch: str, tuned: dict) -> None:
    """Write ``tuned`` rows into the table at ``path``: a swept batch size replaces its row, others stay."""
    existing = json.loads(open(path).read()) if os.path.exists(path) else {}
    shapes = existing.setdefault("arch", {}).setdefault(arch, {})
    for key, rows in tuned.items():
        merged = {max_m: cfg for max_m, cfg in shapes.get(key, [])}
        merged.update({max_m: cfg for max_m, cfg in rows})
        shapes[key] = [[max_m, merged[max_m]] for max_m in sorted(merged)]
    existing["note"] = "written by benchmarks/matmul_sweep.py; see nanovllm/kernels/matmul_configs.py"
    with open(path, "w") as f:
        json.dump(existing, f, indent=1, sort_keys=True)


if __name__ == "__main__":
    main()
