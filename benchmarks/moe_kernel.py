"""The fused MoE's kernels on a GPU at a published model's shape (``SHAPES``: E, top-k, H, I; by default
Qwen3-30B-A3B's, 128, 8, 2048, 768; bf16): exact against the PyTorch twin, and fast against the copy ceiling.

    python -m benchmarks.moe_kernel [--shape NAME] [--tokens 1,16,64,256] [--fp8] [--layers 4] [--group G]
                                    [--int4 | --mxfp4] [--modes w8a8] [--write-table]
                                    # $OUT/moe_kernel_<shape>[_fp8][_int4][_mxfp4].json

Checks: every candidate tile set against ``fused_moe_reference`` (relative error < 2e-2), at each token count and
4096; ``ops.fused_moe`` as registered; (Qwen3 shape, bf16) rows near the end of 140,000 tokens, past 2**31 elements
(int32 offsets).  ``--fp8``: the experts quantized (``weight_quant``: a scale per row, or per ``--group`` columns),
weight-only (``FP8_CANDIDATES``) and W8A8 (``W8A8_CANDIDATES``; then ``W8A8_DOWN``'s down tiles on each count's
fastest); ``--int4``: as GPTQ (symmetric, groups of 128), by the int4 kernels (``INT4_CANDIDATES``) and dequantized
once (``int4-once``); ``--mxfp4``: as ``mxfp4_quant`` stores them, each tile dequantized (FP8's candidates).

Timing: in a CUDA graph over ``--layers`` sets of experts (past L2); bandwidth: the touched experts' bytes (with
scales, zeros) and activations over the time; ``floor``: those bytes at copy bandwidth; ``pick``: the engine's tiles;
``bf16 op``, ``int4 op``, ``w8a8 op``: ``ops.fused_moe`` as registered (bf16: grouped GEMMs where ``grouped_moe``
takes them; int4, and FP8 up to ``cuda_moe.FP8_MAX_MEAN_ROWS``: CUDA C++, FP8 then checked against the weight-only
twin).  ``--write-table`` merges each mode's fastest per token count into the tile table in force
(``moe_tuned.json``, or ``NANOVLLM_MOE_TABLE``); failed candidates are not timed.  Exits non-zero if a check fails.
"""
import argparse
import dataclasses
import functools
import json
import sys
from pathlib import Path

import torch

from benchmarks.common import copy_bandwidth, graph_us, positive_ints, write_json
from nanovllm.kernels import int4_quant, moe_configs, mxfp4_quant, options, weight_quant
from nanovllm.kernels.moe_configs import MoeConfig
from nanovllm.kernels.moe_reference import fused_moe_reference, route_reference

DEV = "cuda"
SHAPES = {"qwen3-30b-a3b": (128, 8, 2048, 768), "qwen3-30b-a3b-tp2": (128, 8, 2048, 384),  # E, top-k, H, I (a rank's)
          "mixtral": (8, 2, 4096, 14336), "qwen3-235b-a22b": (128, 8, 4096, 1536), "gpt-oss-20b": (32, 4, 2880, 2880),
          "gpt-oss-120b": (128, 4, 2880, 2880), "mixtral-8x22b": (8, 2, 6144, 16384),
          "phi-3.5-moe": (16, 2, 4096, 6400), "qwen2-57b-a14b": (64, 8, 3584, 2560)}
E, TOP_K, HIDDEN, INTER = SHAPES["qwen3-30b-a3b"]  # set from --shape by main()
GROUP = max(HIDDEN, INTER)  # FP8 columns per scale, set from --group by main() (int4: 128)
BIG_TOKENS = 140_000  # BIG_TOKENS * TOP_K * HIDDEN > 2**31: the per-pair rows' offsets need int64
CANDIDATES = [MoeConfig(16, 64, 64), MoeConfig(16, 32, 128), MoeConfig(32, 64, 64), MoeConfig(64, 64, 64, num_stages=4),
              MoeConfig(64, 128, 64, num_warps=8, num_stages=4), MoeConfig(16, 64, 64, swap=True),
              MoeConfig(16, 128, 64, swap=True)]
FP8_CANDIDATES = CANDIDATES + [MoeConfig(16, 64, 128), MoeConfig(32, 64, 128), MoeConfig(64, 64, 128, num_stages=4),
                               MoeConfig(64, 128, 128, num_warps=8, num_stages=3),  # a K tile per 128-column group
                               MoeConfig(128, 128, 64, num_warps=8, num_stages=3), MoeConfig(16, 64, 128, swap=True),
                               MoeConfig(16, 128, 128, swap=True), MoeConfig(32, 128, 128, swap=True, num_stages=4)]
INT4_CANDIDATES = CANDIDATES + [MoeConfig(16, 64, 128, swap=True), MoeConfig(16, 128, 128, swap=True),
                                MoeConfig(32, 128, 64, swap=True), MoeConfig(64, 128, 64, num_warps=8, swap=True)]
W8A8_CANDIDATES = [MoeConfig(16, 128, 128), MoeConfig(16, 128, 128, num_warps=8), MoeConfig(16, 64, 128, num_stages=4),
                   MoeConfig(32, 128, 128, num_stages=4), MoeConfig(32, 128, 128, num_warps=8, num_stages=4),
                   MoeConfig(32, 64, 128, num_warps=8, num_stages=4), MoeConfig(64, 128, 128, num_warps=8),
                   MoeConfig(64, 128, 128, num_warps=8, swap=True), MoeConfig(64, 256, 128, num_warps=8, swap=True)]
W8A8_DOWN = [MoeConfig(0, 64, 128), MoeConfig(0, 64, 128, num_stages=4), MoeConfig(0, 128, 128, num_stages=4),
             MoeConfig(0, 256, 128, num_warps=8), MoeConfig(0, 256, 128, num_warps=8, swap=False),
             MoeConfig(0, 128, 128, swap=False)]  # the down GEMM's own tiles, tried on each count's fastest W8A8 set
MODES = {"bf16": CANDIDATES, "fp8": FP8_CANDIDATES, "w8a8": W8A8_CANDIDATES, "int4": INT4_CANDIDATES,
         "int4-once": CANDIDATES, "mxfp4": FP8_CANDIDATES}  # the candidates of each way experts run (MXFP4: FP8's)
CHECKS, BROKEN = [], set()  # every check's record; (mode, candidate) that failed one


def expert_bytes(ids: torch.Tensor, num_tokens: int, mode: str = "bf16") -> int:
    """Bytes a step must move: each expert the routing chose, once (w13 and w2; FP8: a byte per weight and a float32
    scale per row and group; int4: half a byte, an fp16 scale and a uint8 zero), plus bf16 x in and out."""
    touched = int(torch.unique(ids).numel())
    weights = 3 * INTER * HIDDEN
    groups = 2 * INTER * weight_quant.num_groups(HIDDEN, GROUP) + HIDDEN * weight_quant.num_groups(INTER, GROUP)
    per_expert = {"bf16": 2 * weights, "fp8": weights + 4 * groups, "w8a8": weights + 4 * groups,
                  "int4": weights // 2 + 3 * groups, "int4-once": weights // 2 + 3 * groups,
                  "mxfp4": weights // 2 + weights // 32}[mode]
    return touched * per_expert + 2 * num_tokens * HIDDEN * 2


def make_inputs(num_tokens: int, seed: int):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(num_tokens, HIDDEN, device=DEV, generator=g).bfloat16()
    logits = torch.randn(num_tokens, E, device=DEV, generator=g).bfloat16()
    return x, logits


def make_weights():
    """(w13, w2, the op's quantization arguments: none for bf16)."""
    w13 = (torch.randn(E, 2 * INTER, HIDDEN, device=DEV) / HIDDEN ** 0.5).bfloat16()
    w2 = (torch.randn(E, HIDDEN, INTER, device=DEV) / INTER ** 0.5).bfloat16()
    return w13, w2, {}


def quantized(layer, int4: bool = False, mxfp4: bool = False):
    """The FP8 (or int4, or MXFP4) experts of a bf16 ``layer``, as ``make_weights`` gives them."""
    if mxfp4:
        (w13, s13), (w2, s2) = (map(torch.stack, zip(*map(mxfp4_quant.quantize, w))) for w in layer[:2])  # per expert
        return w13, w2, dict(w13_scale=s13, w2_scale=s2, group=mxfp4_quant.BLOCK)
    if int4:
        (w13, s13, z13), (w2, s2, z2) = (int4_quant.quantize(w, GROUP) for w in layer[:2])
        return w13, w2, dict(w13_scale=s13, w2_scale=s2, group=GROUP, w13_zero=z13, w2_zero=z2)
    (w13, s13), (w2, s2) = (weight_quant.quantize(w, GROUP) for w in layer[:2])
    return w13, w2, dict(w13_scale=s13, w2_scale=s2, group=GROUP)


def use(mode: str) -> dict:
    """Experts run as ``mode`` says from the next call on (the engine's W8A8 switch) -> the keywords that make
    int4 experts dequantize once (``int4-once``) or not (``int4``, and MXFP4's ``mxfp4``)."""
    options.set_options(options.KernelOptions(**dict(options.current_options().as_dict(), moe_w8a8=mode == "w8a8")))
    return {"int4": dict(once=False), "int4-once": dict(once=True), "mxfp4": dict(once=False)}.get(mode, {})


def picked(x: torch.Tensor, layer, mode: str) -> MoeConfig | None:
    """The tiles the engine runs ``x`` on ``layer`` with in ``mode`` (None: int4 the other way, bf16 grouped)."""
    from nanovllm.kernels import grouped_moe, triton_moe
    w13, w2, quant = layer
    cfg, once = triton_moe.moe_plan(x, TOP_K, w13, w2, quant.get("w13_scale"), quant.get("w13_zero"),
                                    quant.get("group", 0), None)
    if mode.startswith(("int4", "mxfp4")):
        return None if once != (mode == "int4-once") else cfg
    return None if mode == "bf16" and grouped_moe.grouped_usable(x, TOP_K, w13, w2, False) else cfg


def rel_err(got, want) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def check(case: str, err: float, limit: float = 2e-2) -> bool:
    CHECKS.append({"case": case, "error": err, "ok": err < limit})
    print(f"  {'ok  ' if err < limit else 'FAIL'} {case:48s} {err:.2e}", flush=True)
    return err < limit


def check_tiles(name: str, mode: str, cfg: MoeConfig, x, logits, layer, how: dict, want) -> bool:
    """``cfg`` on ``layer`` against the twin's ``want``; a set that fails, or cannot compile or run, joins BROKEN."""
    from nanovllm.kernels.triton_moe import fused_moe_triton
    try:
        err = rel_err(fused_moe_triton(x, logits, *layer[:2], TOP_K, True, **layer[2], cfg=cfg, **how), want)
    except Exception as e:  # noqa: BLE001 - a candidate that cannot compile or run is a failed check
        print(f"  {type(e).__name__}: {str(e)[:300]}")
        err = float("inf")
    d = cfg.down
    if not check(f"{name} block_m={cfg.block_m} n={cfg.block_n} k={cfg.block_k} swap={cfg.swap} down="
                 f"{d and (d.block_n, d.num_warps, d.num_stages, d.swap)}", err):
        BROKEN.add((mode, cfg))
    return (mode, cfg) not in BROKEN


def check_exactness(tokens: list[int], variants: list) -> None:
    """Each candidate of each mode on its first layer (``variants``: (layer, mode)) against the twin."""
    from nanovllm.kernels import cuda, cuda_moe, ops
    from nanovllm.kernels.triton_moe import fused_moe_triton
    cuda.register_cuda_kernels()
    for t in sorted(set(tokens + [4096])):
        x, logits = make_inputs(t, seed=t)
        for (w13, w2, quant), mode in variants:
            how = use(mode)
            name, want = f"T={t} {mode}", fused_moe_reference(x, logits, w13, w2, TOP_K, True, **quant)
            for cfg in MODES[mode]:
                check_tiles(name, mode, cfg, x, logits, (w13, w2, quant), how, want)
            if mode == "w8a8" and cuda_moe.moe_usable(x, TOP_K, w13, w2, (quant["w13_scale"], quant["w2_scale"]),
                                                      (None, None), GROUP):  # the CUDA kernel's: weight-only
                use("fp8")
                want = fused_moe_reference(x, logits, w13, w2, TOP_K, True, **quant)
            check(f"{name} ops.fused_moe", rel_err(ops.fused_moe(x, logits, w13, w2, TOP_K, True, **quant), want))
    if BIG_TOKENS * TOP_K * HIDDEN < 2 ** 31 or variants[0][1] != "bf16":
        return
    (w13, w2, _), (x, logits) = variants[0][0], make_inputs(BIG_TOKENS, seed=1)
    got, rows = fused_moe_triton(x, logits, w13, w2, TOP_K, True), torch.arange(BIG_TOKENS - 64, BIG_TOKENS, device=DEV)
    check(f"T={BIG_TOKENS} rows past 2**31 elements",
          rel_err(got[rows], fused_moe_reference(x[rows], logits[rows], w13, w2, TOP_K, True)))


def timing_rows(tokens: list[int], variants: list, bandwidth: float) -> list[dict]:
    """``variants``: per mode, its ``--layers`` layers and the mode; W8A8 then tries ``W8A8_DOWN`` (checked first)."""
    from nanovllm.kernels import ops
    from nanovllm.kernels.triton_moe import fused_moe_triton
    print("| T | weights | block_m | block_n | block_k | swap | down: n, warps, stages, swap | pick | us | floor us | "
          "experts | GB/s | of copy |\n" + "|---" * 13 + "|")
    rows = []
    for t in tokens:
        inputs = [make_inputs(t, seed=100 * t + i) for i in range(len(variants[0][0]))]
        routed = [route_reference(lg, TOP_K, True)[1] for _, lg in inputs]
        touched = sum(int(torch.unique(ids).numel()) for ids in routed) / len(inputs)
        for layers, mode in variants:
            how = use(mode)
            pick = picked(inputs[0][0], layers[0], mode)
            nbytes = sum(expert_bytes(ids, t, mode) for ids in routed) / len(inputs)

            def timed(cfg):  # None: the registered op, as the engine runs it
                op = ops.fused_moe if cfg is None else functools.partial(fused_moe_triton, cfg=cfg, **how)
                calls = [lambda x=x, lg=lg, w=w: op(x, lg, w[0], w[1], TOP_K, True, **w[2])
                         for (x, lg), w in zip(inputs, layers)]
                us = graph_us(calls, replays=10)
                name, cfg = (mode, cfg) if cfg is not None else (f"{mode} op", MoeConfig(0, 0, 0))
                row = {"tokens": t, "weights": name, **dataclasses.asdict(cfg), "picked": name == mode and cfg == pick,
                       "us": round(us, 1), "floor_us": round(nbytes / bandwidth * 1e6, 1),
                       "experts_touched": round(touched, 1),
                       "gbps": round(nbytes / us / 1e3, 1), "of_copy": round(nbytes / us / 1e3 / (bandwidth / 1e9), 3)}
                d = cfg.down
                print(f"| {t} | {name} | {cfg.block_m} | {cfg.block_n} | {cfg.block_k} | {cfg.swap} | "
                      f"{d and (d.block_n, d.num_warps, d.num_stages, d.swap)} | {'*' if row['picked'] else ''} | "
                      f"{row['us']} | {row['floor_us']} | {row['experts_touched']} | {row['gbps']} | "
                      f"{row['of_copy']:.1%} |", flush=True)
                rows.append(row)
                return us, cfg
            results = [timed(c) for c in MODES[mode] if (mode, c) not in BROKEN]  # failed: neither timed nor kept
            if mode in ("int4", "bf16", "w8a8"):  # the registered op too, apart from the tiles' results
                timed(None)
            if mode == "w8a8" and results:
                (x, lg), (w13, w2, quant) = inputs[0], layers[0]
                want = fused_moe_reference(x, lg, w13, w2, TOP_K, True, **quant)
                best = min(results, key=lambda r: r[0])[1]
                for d in W8A8_DOWN:
                    cfg = dataclasses.replace(best, down=dataclasses.replace(d, block_m=best.block_m))
                    if check_tiles(f"T={t} w8a8", mode, cfg, x, lg, layers[0], how, want):
                        timed(cfg)
    return rows


def write_table(rows: list[dict]) -> str:
    """The fastest candidate of each mode at each token count, as buckets of rows per expert (a bucket reaches a
    measured count; the last serves all), merged into the tile table in force (``moe_configs.table_path``) under
    this GPU and shape; ``int4_once_rows``: past the last count where the int4 kernels beat dequantizing once
    (null where they win at the largest)."""
    best = {}
    for r in rows:
        if (r["weights"], r["tokens"]) not in best or r["us"] < best[r["weights"], r["tokens"]]["us"]:
            best[r["weights"], r["tokens"]] = r
    fields = [f.name for f in dataclasses.fields(MoeConfig)]
    buckets = {}
    for mode in moe_configs.MODES:
        tokens = sorted(t for m, t in best if m == mode)
        merged = []
        for i, t in enumerate(tokens):
            limit = t * TOP_K / E if i < len(tokens) - 1 else float("inf")
            cfg = MoeConfig.from_json({k: best[mode, t][k] for k in fields})
            merged = merged[:-1] if merged and merged[-1][1] == cfg else merged
            merged.append((limit, cfg))
        if merged:
            buckets[mode] = merged
    paired = sorted(t for m, t in best if m == "int4" and ("int4-once", t) in best)
    wins = [t for t in paired if best["int4", t]["us"] <= best["int4-once", t]["us"]]  # the int4 kernels'
    once_rows = None if paired and wins and wins[-1] == paired[-1] else wins[-1] * TOP_K / E if wins else 0.0
    path = moe_configs.table_path()
    table = json.loads(Path(path).read_text()) if Path(path).exists() else {}
    arch = "%d.%d" % torch.cuda.get_device_capability()
    shapes = table.setdefault("arch", {}).setdefault(arch, {})
    key = moe_configs.table_key(E, INTER, HIDDEN)
    shapes[key] = dict(shapes.get(key, {}), **moe_configs.entry_json(buckets, once_rows))
    table.setdefault("devices", {})[arch] = torch.cuda.get_device_name()
    Path(path).write_text(json.dumps(table, indent=1, sort_keys=True) + "\n")
    print(f"tile table: {path} [{arch}][{key}] <- {', '.join(buckets)}")
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    p.add_argument("--tokens", default="1,16,64,256", help="token counts to time (comma-separated)")
    p.add_argument("--layers", type=int, default=4, help="expert weight sets the timed graph cycles over")
    p.add_argument("--no-timing", action="store_true", help="run the exactness checks only")
    p.add_argument("--fp8", action="store_true", help="also FP8 experts (weight_quant), beside bf16")
    p.add_argument("--group", type=int, default=0, help="FP8 columns per scale (default: one scale per row)")
    p.add_argument("--int4", action="store_true", help="also int4 experts (int4_quant, groups of 128), beside bf16")
    p.add_argument("--mxfp4", action="store_true", help="also MXFP4 experts (mxfp4_quant), beside bf16")
    p.add_argument("--write-table", action="store_true", help="merge the winners into the tile table in force")
    p.add_argument("--modes", default="", help="only these of the modes (comma-separated, e.g. w8a8)")
    args = p.parse_args()
    if (args.int4 or args.mxfp4) and (args.fp8 or args.int4 and args.mxfp4 or args.group not in (0, 128)):
        raise SystemExit("--int4 or --mxfp4 runs beside bf16 alone: leave out --fp8, --group and the other")
    tokens = positive_ints(args.tokens, "--tokens")
    global E, TOP_K, HIDDEN, INTER, GROUP
    E, TOP_K, HIDDEN, INTER = SHAPES[args.shape]
    GROUP = 128 if args.int4 else args.group or max(HIDDEN, INTER)
    torch.manual_seed(0)
    layers = [make_weights() for _ in range(max(1, args.layers))]
    variants = [(layers, "bf16")]
    if args.fp8 or args.int4 or args.mxfp4:
        quant = [quantized(layer, args.int4, args.mxfp4) for layer in layers]
        modes = ("int4", "int4-once") if args.int4 else ("mxfp4",) if args.mxfp4 else ("fp8", "w8a8")
        variants += [(quant, mode) for mode in modes]
    variants = [v for v in variants if not args.modes or v[1] in args.modes.split(",")]
    if not variants:
        raise SystemExit(f"--modes {args.modes!r} names none of this run's modes")
    print(f"== exactness ({', '.join(m for _, m in variants)}; against fused_moe_reference)", flush=True)
    check_exactness(tokens, [(v[0], mode) for v, mode in variants])
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth (read + write): {bandwidth / 1e9:.0f} GB/s")
    rows = [] if args.no_timing else timing_rows(tokens, variants, bandwidth)
    failed = [c for c in CHECKS if not c["ok"]]
    print(f"checks: {len(CHECKS) - len(failed)}/{len(CHECKS)} ok")
    if args.write_table and rows:
        write_table(rows)
    suffix = "".join(f"_{m}" for m in ("fp8", "int4", "mxfp4") if getattr(args, m))
    write_json(f"moe_kernel_{args.shape}{suffix}.json",
               {"device": torch.cuda.get_device_name(), "shape": dict(E=E, top_k=TOP_K, hidden=HIDDEN,
                intermediate=INTER), "copy_gbps": round(bandwidth / 1e9, 1), "checks": CHECKS, "timing": rows})
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
