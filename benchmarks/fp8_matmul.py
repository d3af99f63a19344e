"""FP8 weight-only projections on the GPU: which way of multiplying by an FP8 weight wins, per shape and row count.

    python -m benchmarks.fp8_matmul                          # Qwen3-0.6B, -8B and -32B shapes, M = 1 .. 8192
    python -m benchmarks.fp8_matmul --shapes qwen3-8b:gate_up,qwen3-8b:down --m 1,16,256
    python -m benchmarks.fp8_matmul --configs "16,64,128,4,1,4,4;64,128,64,1,0,4,3"

For each projection (qkv, o, gate_up with the fused SiLU-and-multiply, down) and each M it times, as CUDA-graph
replays of one call per layer copy (so that the weights come from memory, not L2): bf16 cuBLAS (``F.linear``),
the FP8 Triton kernel with ``matmul_configs.fp8_config``'s heuristic config (past ``FP8_TRITON_MAX_M`` too,
where the engine does not take it), a few alternatives around it plus ``--configs``, and dequantize-then-cuBLAS
(the engine's large-M path).  Each is checked against the float32 twin (relative error < 2e-2).  One row per
(shape, M): microseconds, the FP8 byte floor (weight and scale bytes over copy bandwidth) and the winner.
Writes every timing with its config to ``$OUT/fp8_matmul.json``, and under ``fp8_table`` the fastest FP8 Triton
config per shape and M (None where dequantize+cuBLAS won) in ``matmul_configs``' table layout: the measured
entries that should replace the heuristic.  ``--configs``: ``block_m,block_n,block_k,split_k,swap,num_warps,
num_stages`` per config.
"""
import argparse
import time

from benchmarks.common import copy_bandwidth, graph_us, write_json

# The fields benchmarks.matmul_sweep.model_shapes reads, of the three Qwen3 sizes the FP8 issue measures.
MODELS = {
    "qwen3-0.6b": dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, intermediate_size=3072, vocab_size=151936),
    "qwen3-8b": dict(hidden_size=4096, num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, intermediate_size=12288, vocab_size=151936),
    "qwen3-32b": dict(hidden_size=5120, num_hidden_layers=64, num_attention_heads=64, num_key_value_heads=8,
                      head_dim=128, intermediate_size=25600, vocab_size=151936),
}
DEV = "cuda"
PROJECTIONS = ("qkv", "o", "gate_up", "down")  # the LM head stays in the model dtype
M_VALUES = "1,2,4,8,16,32,64,128,256,512,1024,4096,8192"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=",".join(MODELS),
                   help="models and/or model:projection pairs, comma-separated (projections: qkv, o, gate_up, down)")
    p.add_argument("--m", default=M_VALUES, help="row counts, comma-separated")
    p.add_argument("--configs", default="", help="extra FP8 configs to time, ';'-separated, each "
                                                 "block_m,block_n,block_k,split_k,swap,num_warps,num_stages")
    p.add_argument("--group", type=int, default=128, help="input columns per weight scale")
    p.add_argument("--replays", type=int, default=10, help="graph replays per timing")
    return p.parse_args(argv)


def selected_shapes(spec: str) -> list[tuple[str, str]]:
    """(model, projection) pairs of ``--shapes``."""
    out = []
    for item in spec.split(","):
        model, _, proj = item.partition(":")
        if model not in MODELS or (proj and proj not in PROJECTIONS):
            raise SystemExit(f"--shapes: unknown {item!r}; models {', '.join(MODELS)}, projections "
                             f"{', '.join(PROJECTIONS)}")
        out += [(model, p) for p in ([proj] if proj else PROJECTIONS)]
    return out


def parse_configs(spec: str):
    from nanovllm.kernels.matmul_configs import MatmulConfig
    configs = []
    for item in filter(None, spec.split(";")):
        v = [int(f) for f in item.split(",")]
        if len(v) != 7:
            raise SystemExit(f"--configs: {item!r} must have 7 fields "
                             "(block_m,block_n,block_k,split_k,swap,num_warps,num_stages)")
        configs.append(MatmulConfig(v[0], v[1], v[2], v[3], bool(v[4]), v[5], v[6]))
    return configs


def alternatives(cfg, extra) -> list:
    """Configs near the heuristic's: split K doubled and halved, the other N tile, and the other operand order
    (small M tiles) or one pipeline stage more (large ones), then ``extra``."""
    from dataclasses import replace
    near = [replace(cfg, split_k=cfg.split_k * 2), replace(cfg, split_k=max(1, cfg.split_k // 2)),
            replace(cfg, block_n=128 if cfg.block_n == 64 else 64),
            replace(cfg, swap=not cfg.swap) if cfg.block_m <= 32 else replace(cfg, num_stages=cfg.num_stages + 1)]
    out = []
    for c in near + list(extra):
        if c != cfg and c not in out:
            out.append(c)
    return out


def fp8_table(rows) -> dict:
    """The measurements as ``matmul_configs``' table rows: ``{"N_OUT,K,silu": [[max_m, config or None], ...]}``,
    the fastest FP8 Triton config where it beats dequantize+cuBLAS, else None."""
    from nanovllm.kernels.matmul_configs import table_key
    table = {}
    for r in rows:
        table.setdefault(table_key(r["n_out"], r["k"], r["silu"]), []).append([r["m"], r["best_fp8_config"]])
    return table


def bench_shape(model, proj, ms, group, extra, replays, bandwidth, sms, log):
    import torch
    import torch.nn.functional as F

    from benchmarks.kernel_bench import copies
    from benchmarks.matmul_sweep import model_shapes
    from nanovllm.kernels import weight_quant
    from nanovllm.kernels.matmul_configs import fp8_config
    from nanovllm.kernels.reference import linear_reference
    from nanovllm.kernels.triton_matmul import dequantize_triton, linear_triton, silu_mul_triton

    n, k, layers, silu = model_shapes(MODELS[model])[proj]
    n_out = n // 2 if silu else n
    bf16 = [torch.randn(n, k, device=DEV, dtype=torch.bfloat16) / k ** 0.5
            for _ in range(min(layers, copies(2 * n * k)))]
    fp8 = [weight_quant.quantize(w, group) for w in bf16]
    fp8_bytes = n * k + fp8[0][1].numel() * 4
    floor_us = fp8_bytes / bandwidth * 1e6
    rows = []
    for m in ms:
        x = torch.randn(m, k, device=DEV, dtype=torch.bfloat16)
        want = linear_reference(x.float(), fp8[0][0], None, silu, fp8[0][1], group)

        def finish(y):
            return silu_mul_triton(y) if silu else y

        def cublas_bf16(i):
            return finish(F.linear(x, bf16[i]))

        def dequant_cublas(i):
            w, s = fp8[i]
            return finish(F.linear(x, dequantize_triton(w, s, group, x.dtype)))

        def triton_with(cfg):
            return lambda i: linear_triton(x, fp8[i][0], None, cfg, silu, fp8[i][1], group)

        def timed(fn, check=True):
            """Microseconds per call of fn over the layer copies; None where it is wrong or does not run."""
            try:
                if check:
                    err = ((fn(0).float() - want).norm() / want.norm()).item()
                    if not err < 2e-2:
                        log(f"  {model}:{proj} m={m}: WRONG (relative error {err:.2e})")
                        return None
                return graph_us([lambda i=i: fn(i) for i in range(len(fp8))], replays=replays)
            except Exception as e:  # e.g. out of shared memory: not a candidate here
                log(f"  {model}:{proj} m={m}: {type(e).__name__}: {str(e)[:100]}")
                return None

        cfg = fp8_config(m, n_out, k, group, sms)
        row = {"model": model, "proj": proj, "n_out": n_out, "k": k, "silu": silu, "m": m, "group": group,
               "floor_us": round(floor_us, 2), "bf16_cublas_us": timed(cublas_bf16, check=False),
               "dequant_cublas_us": timed(dequant_cublas), "heuristic": vars(cfg) if cfg else None,
               "heuristic_us": timed(triton_with(cfg)) if cfg else None, "alternatives": []}
        for alt in alternatives(cfg, extra) if cfg else extra:
            if alt.fits_fp8(k, group):
                row["alternatives"].append([timed(triton_with(alt)), vars(alt)])
        timed_alts = sorted(([us, c] for us, c in row["alternatives"] if us is not None), key=lambda r: r[0])
        best_alt_us = timed_alts[0][0] if timed_alts else None
        contenders = {"bf16_cublas": row["bf16_cublas_us"], "dequant_cublas": row["dequant_cublas_us"],
                      "fp8_heuristic": row["heuristic_us"], "fp8_alternative": best_alt_us}
        contenders = {name: us for name, us in contenders.items() if us is not None}
        fp8_ways = {name: us for name, us in contenders.items() if name != "bf16_cublas"}
        row["winner"] = min(contenders, key=contenders.get)
        row["fp8_winner"] = min(fp8_ways, key=fp8_ways.get) if fp8_ways else None
        row["best_fp8_config"] = (timed_alts[0][1] if row["fp8_winner"] == "fp8_alternative" else
                                  row["heuristic"] if row["fp8_winner"] == "fp8_heuristic" else None)
        rows.append(row)
        log(f"| {model} | {proj} | {m} | {floor_us:.1f} | {fmt(row['bf16_cublas_us'])} | "
            f"{fmt(row['heuristic_us'])} | {fmt(best_alt_us)} | {fmt(row['dequant_cublas_us'])} | {row['winner']} | "
            f"{fmt(min(fp8_ways.values()) / floor_us if fp8_ways else None, 2)} |")
    return rows


def fmt(v, digits=1):
    return "-" if v is None else f"{v:.{digits}f}"


def main(argv=None):
    args = parse_args(argv)
    shapes, extra = selected_shapes(args.shapes), parse_configs(args.configs)
    ms = sorted({int(m) for m in args.m.split(",")})
    import torch

    from nanovllm.kernels.triton_common import _num_sms
    device = torch.device(DEV)
    bandwidth, sms = copy_bandwidth(device), _num_sms(device)
    print(f"{torch.cuda.get_device_name()}, {sms} SMs, copy {bandwidth / 1e9:.0f} GB/s, FP8 group {args.group}")
    print("| model | proj | M | FP8 floor us | bf16 cuBLAS us | FP8 heuristic us | best alternative us | "
          "dequant+cuBLAS us | winner | best FP8 / floor |\n|---|---|---|---|---|---|---|---|---|---|", flush=True)
    rows, start = [], time.perf_counter()
    for model, proj in shapes:  # saved after every shape, so a cut-off run keeps what it measured
        rows += bench_shape(model, proj, ms, args.group, extra, args.replays, bandwidth, sms,
                            lambda s: print(s, flush=True))
        write_json("fp8_matmul.json", {"device": torch.cuda.get_device_name(), "sms": sms,
                                       "copy_bandwidth": bandwidth, "group": args.group,
                                       "seconds": round(time.perf_counter() - start, 1),
                                       "fp8_table": fp8_table(rows), "rows": rows})
        torch.cuda.empty_cache()
    print(f"{len(rows)} rows in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
