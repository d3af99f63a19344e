"""The fused MoE's Triton kernels on a GPU, at Qwen3-30B-A3B's shape (E=128, top-8, H=2048, I=768, bf16) or
Mixtral-8x7B's (E=8, top-2, H=4096, I=14336): exact against the PyTorch twin, and fast against the copy ceiling.

    python -m benchmarks.moe_kernel [--shape qwen3-30b-a3b|mixtral] [--tokens 1,16,64,256] [--layers 4]
                                                                      # writes $OUT/moe_kernel_<shape>.json

Checks: every candidate tile set against ``fused_moe_reference`` (relative error < 2e-2), at each
token count and at a prefill of 4096 tokens; ``ops.fused_moe`` through the CUDA registration; and (Qwen3 shape) a
prefill of 140,000 tokens, whose per-pair rows pass 2**31 elements (the int32-offset pitfall), on rows near its end.

Timing: each candidate captured in a CUDA graph and replayed, cycling over ``--layers`` sets of expert weights
(1.2 GB each, far past L2, as consecutive layers are in a step).  Bandwidth is the bytes of the experts the
routing touched (each once) plus activations, over the time.  The ``pick`` column marks the candidate
``moe_configs.choose`` dispatches to: the fastest row per token count is the measurement to put in
``nanovllm/kernels/moe_configs.py``.  Exits non-zero if a check fails.
"""
import argparse
import sys

import torch

from benchmarks.common import copy_bandwidth, graph_us, write_json
from nanovllm.kernels import moe_configs
from nanovllm.kernels.moe_configs import MoeConfig
from nanovllm.kernels.moe_reference import fused_moe_reference, route_reference

DEV = "cuda"
SHAPES = {"qwen3-30b-a3b": (128, 8, 2048, 768), "mixtral": (8, 2, 4096, 14336)}  # E, top-k, H, I
E, TOP_K, HIDDEN, INTER = SHAPES["qwen3-30b-a3b"]  # set from --shape by main()
BIG_TOKENS = 140_000  # BIG_TOKENS * TOP_K * HIDDEN > 2**31: the per-pair rows' offsets need int64
CANDIDATES = [MoeConfig(16, 64, 64), MoeConfig(16, 32, 128), MoeConfig(32, 64, 64), MoeConfig(64, 64, 64, num_stages=4),
              MoeConfig(64, 128, 64, num_warps=8, num_stages=4)]
CHECKS: list[dict] = []


def expert_bytes(ids: torch.Tensor, num_tokens: int, elem: int = 2) -> int:
    """Bytes a step must move: each expert the routing chose, once (w13 and w2), plus x in and out."""
    touched = int(torch.unique(ids).numel())
    return touched * 3 * INTER * HIDDEN * elem + 2 * num_tokens * HIDDEN * elem


def make_inputs(num_tokens: int, seed: int):
    g = torch.Generator(device=DEV).manual_seed(seed)
    x = torch.randn(num_tokens, HIDDEN, device=DEV, generator=g).bfloat16()
    logits = torch.randn(num_tokens, E, device=DEV, generator=g).bfloat16()
    return x, logits


def make_weights():
    w13 = (torch.randn(E, 2 * INTER, HIDDEN, device=DEV) / HIDDEN ** 0.5).bfloat16()
    w2 = (torch.randn(E, HIDDEN, INTER, device=DEV) / INTER ** 0.5).bfloat16()
    return w13, w2


def rel_err(got, want) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30)).item()


def check(case: str, err: float, limit: float = 2e-2) -> None:
    CHECKS.append({"case": case, "error": err, "ok": err < limit})
    print(f"  {'ok  ' if err < limit else 'FAIL'} {case:48s} {err:.2e}", flush=True)


def check_exactness(tokens: list[int], weights) -> None:
    from nanovllm.kernels import ops
    from nanovllm.kernels.cuda import register_cuda_kernels
    from nanovllm.kernels.triton_moe import fused_moe_triton
    register_cuda_kernels()
    w13, w2 = weights
    for t in tokens + [4096]:
        x, logits = make_inputs(t, seed=t)
        want = fused_moe_reference(x, logits, w13, w2, TOP_K, True)
        for cfg in CANDIDATES:
            check(f"T={t} block_m={cfg.block_m} n={cfg.block_n} k={cfg.block_k}",
                  rel_err(fused_moe_triton(x, logits, w13, w2, TOP_K, True, cfg=cfg), want))
        check(f"T={t} ops.fused_moe (registered)", rel_err(ops.fused_moe(x, logits, w13, w2, TOP_K, True), want))
    if BIG_TOKENS * TOP_K * HIDDEN < 2 ** 31:
        return
    big = BIG_TOKENS
    x, logits = make_inputs(big, seed=1)
    got = fused_moe_triton(x, logits, w13, w2, TOP_K, True)
    rows = torch.arange(big - 64, big, device=x.device)
    check(f"T={big} rows past 2**31 elements",
          rel_err(got[rows], fused_moe_reference(x[rows], logits[rows], w13, w2, TOP_K, True)))
    del x, logits, got


def timing_rows(tokens: list[int], layers: list, bandwidth: float) -> list[dict]:
    from nanovllm.kernels.triton_moe import fused_moe_triton
    print("| T | block_m | block_n | block_k | pick | us | experts | GB/s | of copy |\n"
          "|---|---|---|---|---|---|---|---|---|")
    rows = []
    for t in tokens:
        inputs = [make_inputs(t, seed=100 * t + i) for i in range(len(layers))]
        nbytes = sum(expert_bytes(route_reference(lg, TOP_K, True)[1], t) for _, lg in inputs) / len(inputs)
        touched = sum(int(torch.unique(route_reference(lg, TOP_K, True)[1]).numel()) for _, lg in inputs)
        picked = moe_configs.choose(t, TOP_K, E)
        for cfg in CANDIDATES:
            calls = [lambda x=x, lg=lg, w=w: fused_moe_triton(x, lg, w[0], w[1], TOP_K, True, cfg=cfg)
                     for (x, lg), w in zip(inputs, layers)]
            us = graph_us(calls, replays=10)
            row = {"tokens": t, "block_m": cfg.block_m, "block_n": cfg.block_n,
                   "block_k": cfg.block_k, "picked": cfg == picked, "us": round(us, 1),
                   "experts_touched": round(touched / len(inputs), 1), "gbps": round(nbytes / us / 1e3, 1),
                   "of_copy": round(nbytes / us / 1e3 / (bandwidth / 1e9), 3)}
            rows.append(row)
            print(f"| {t} | {cfg.block_m} | {cfg.block_n} | {cfg.block_k} | "
                  f"{'*' if row['picked'] else ''} | {row['us']} | {row['experts_touched']} | {row['gbps']} | "
                  f"{row['of_copy']:.1%} |", flush=True)
    return rows


def parse_tokens(text: str) -> list[int]:
    try:
        tokens = [int(v) for v in text.split(",")]
    except ValueError:
        raise SystemExit(f"--tokens must be comma-separated ints, got {text!r}")
    if not tokens or min(tokens) < 1:
        raise SystemExit(f"--tokens must be positive, got {text!r}")
    return tokens


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-30b-a3b")
    p.add_argument("--tokens", default="1,16,64,256", help="token counts to time (comma-separated)")
    p.add_argument("--layers", type=int, default=4, help="expert weight sets the timed graph cycles over")
    p.add_argument("--no-timing", action="store_true", help="run the exactness checks only")
    args = p.parse_args()
    tokens = parse_tokens(args.tokens)
    global E, TOP_K, HIDDEN, INTER
    E, TOP_K, HIDDEN, INTER = SHAPES[args.shape]
    torch.manual_seed(0)
    layers = [make_weights() for _ in range(max(1, args.layers))]
    print("== exactness (bf16, against fused_moe_reference)", flush=True)
    check_exactness(tokens, layers[0])
    bandwidth = copy_bandwidth()
    print(f"copy bandwidth (read + write): {bandwidth / 1e9:.0f} GB/s")
    rows = [] if args.no_timing else timing_rows(tokens, layers, bandwidth)
    failed = [c for c in CHECKS if not c["ok"]]
    print(f"checks: {len(CHECKS) - len(failed)}/{len(CHECKS)} ok")
    write_json(f"moe_kernel_{args.shape}.json", {"device": torch.cuda.get_device_name(), "shape": dict(E=E, top_k=TOP_K,
               hidden=HIDDEN, intermediate=INTER), "copy_gbps": round(bandwidth / 1e9, 1),
               "checks": CHECKS, "timing": rows})
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
