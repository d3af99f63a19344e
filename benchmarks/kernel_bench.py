"""The fused Triton kernels' speed on a GPU against the copy ceiling (their exactness is tests/gpu/test_kernels.py).

    python -m benchmarks.kernel_bench        # prints a table, writes $OUT/kernel_bench.json
    python -m benchmarks.kernel_bench --int4 [--rows 1,16,64,256] [--tokens 16,256] [--sweep 1,16]
                                             # writes $OUT/int4_kernel.json

Each case is timed as CUDA-graph replays, each call on its own buffers where one would fit in L2: the bytes a
kernel must move over its time, as a share of the device-to-device copy bandwidth.  Decode attention at bench's
shapes (Qwen3-0.6B heads, bf16, KV block 64; over a bf16 and an FP8 cache, half the KV bytes), the sampler over
Qwen3's vocabulary, and each tuned matmul of this GPU's dispatch table at the largest batch its Triton config serves.
``--int4``: the w4a16 projection on Qwen3-8B's shapes and the fused MoE with int4 experts on Qwen3-30B-A3B's, each
checked against its twin (relative error < 2e-2; exit 1 otherwise), timed against bf16 over four weights cycled and
against the int4 byte floor; ``--sweep ROWS`` also times every candidate Triton tile (BLOCK_N 32-128, split K 1-16,
2 or 4 stages) and, up to 8 rows, the CUDA C++ tensor-core kernel.
``--delta``: the decode delta rule's value block and warps, against its float32 state's read and write.
``--lora``: the multi-LoRA op on Qwen3-8B's projections (rank 16 on 8 of 9 slots, tokens round robin), checked
against its twin, beside the base product's bf16 matmul of the same tokens.
"""
import argparse
import math
import sys

import torch

from benchmarks.common import copy_bandwidth, graph_us, positive_ints, rel_err, write_json
from nanovllm.kernels import int4_quant, moe_reference, ops, reference
from nanovllm.kernels.matmul_configs import MatmulConfig

DEV = "cuda"
BF16 = torch.bfloat16
L2_SAFE_BYTES = 256 << 20  # buffers of one timed graph add up to at least this (several times any L2)
VOCAB = 151936  # Qwen3's


def make_cache(ctx_lens, num_kv_heads, head_dim, block_size, dtype, spare=3):
    """Random K/V caches and block tables over shuffled blocks (``(k, v, tables, context_lens)`` on the GPU);
    rows of context 0 keep an all-zero table."""
    per_seq = [-(-c // block_size) for c in ctx_lens]
    used = sum(per_seq)
    perm = torch.randperm(used + spare, dtype=torch.int32)
    rows = list(perm[:used].split(per_seq)) + [torch.zeros(1, dtype=torch.int32)]  # the last: width >= 1
    tables = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)[:-1]
    k, v = (torch.randn(used + spare, num_kv_heads, block_size, head_dim, dtype=dtype, device=DEV) for _ in range(2))
    return k, v, tables.to(DEV), torch.tensor(ctx_lens, dtype=torch.int32, device=DEV)


def tuned_matmuls() -> list[tuple[str, int, int, bool, int, object]]:
    """(table key, n_out, k, silu, max_m, config) of every Triton entry in this GPU's dispatch table in force."""
    from nanovllm.kernels import matmul_configs
    out = []
    for key, entries in matmul_configs._table(torch.device(DEV)).items():
        n_out, k, silu = (int(v) for v in key.split(","))
        out += [(key, n_out, k, bool(silu), m, cfg) for m, cfg in entries if cfg is not None]
    return out


def sampler_args(batch: int, vocab: int = VOCAB):
    """Arguments of ``gumbel_argmax_triton`` for ``batch`` rows: half greedy, half at temperature 0.6."""
    g = torch.Generator(device=DEV).manual_seed(batch)
    logits = (torch.randn(batch, vocab, device=DEV, generator=g) * 3).to(BF16)
    temperature = torch.where(torch.arange(batch, device=DEV) % 2 == 0, 0.0, 0.6)
    seeds = torch.randint(0, 2**62, (batch,), device=DEV, generator=g)
    return logits, temperature, seeds, torch.randint(0, 4096, (batch,), device=DEV, generator=g)


def copies(nbytes: int) -> int:
    return max(1, min(64, math.ceil(L2_SAFE_BYTES / nbytes)))


def timed(kernel: str, case: str, nbytes: int, calls, bandwidth: float) -> dict:
    us = graph_us(calls, replays=10)
    row = {"kernel": kernel, "case": case, "us": round(us, 1), "gbps": round(nbytes / us / 1e3, 1),
           "of_copy": round(nbytes / us / 1e3 / (bandwidth / 1e9), 3)}
    print(f"| {kernel} | {case} | {row['us']} | {row['gbps']} | {row['of_copy']:.1%} |", flush=True)
    return row


def timing_rows(bandwidth: float) -> list[dict]:
    from nanovllm.kernels.kv_quant import FP8_DTYPE
    from nanovllm.kernels.triton_decode import decode_attention_triton
    from nanovllm.kernels.triton_matmul import linear_triton
    from nanovllm.kernels.triton_sampler import gumbel_argmax_triton
    rows, hq, hkv, d = [], 16, 8, 128
    for batch, ctx in [(256, 1024), (64, 4096), (8, 16384), (128, "1..4096")]:
        lens = torch.randint(1, 4097, (batch,)).tolist() if ctx == "1..4096" else [ctx] * batch
        kc, vc, bt, cl = make_cache(lens, hkv, d, 64, BF16)
        q = torch.randn(batch, hq, d, dtype=BF16, device=DEV)
        nbytes = sum(lens) * hkv * d * 2 * 2 + 2 * q.numel() * 2
        rows.append(timed("decode attention", f"B{batch} ctx {ctx}", nbytes,
                          [lambda: decode_attention_triton(q, kc, vc, bt, cl, d ** -0.5)] * 5, bandwidth))
        k8, v8 = (c.clamp(-448, 448).to(FP8_DTYPE) for c in (kc, vc))
        scales = [torch.full((hkv,), 0.01, device=DEV) for _ in range(2)]
        rows.append(timed("decode attention, FP8 KV", f"B{batch} ctx {ctx}", nbytes // 2 + q.numel() * 2,
                          [lambda: decode_attention_triton(q, k8, v8, bt, cl, d ** -0.5, *scales)] * 5, bandwidth))
        del kc, vc, k8, v8
    for batch in (8, 64, 256):
        sets = [sampler_args(batch) for _ in range(copies(batch * VOCAB * 2))]
        rows.append(timed("sampler", f"B{batch} x {VOCAB}", batch * VOCAB * 2,
                          [lambda a=a: gumbel_argmax_triton(*a) for a in sets], bandwidth))
    for key, n_out, k, silu, m, cfg in tuned_matmuls():
        n = 2 * n_out if silu else n_out
        weights = [torch.randn(n, k, device=DEV, dtype=BF16) for _ in range(copies(n * k * 2))]
        x = torch.randn(m, k, device=DEV, dtype=BF16)
        rows.append(timed("matmul", f"{key} m={m}", 2 * (n * k + m * k + m * n_out),
                          [lambda w=w: linear_triton(x, w, None, cfg, silu) for w in weights], bandwidth))
    return rows


INT4_GROUP = 128
INT4_SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (24576, 4096), "down": (4096, 12288)}  # Qwen3-8B
INT4_MOE = (128, 8, 2048, 768)  # Qwen3-30B-A3B: experts, top-k, hidden, intermediate


def int4_projections(rows: list[int], sweep: list[int], bandwidth: float, table: list, tiles: list) -> tuple:
    """(rows, swept): each projection shape at each of ``rows``, the dispatched op checked against its twin and timed
    beside bf16 and the int4 floor; at each of ``sweep`` rows every candidate Triton tile and, up to 8 rows, the
    CUDA C++ kernel, on the same weights, each checked too (Triton's pick marked)."""
    from nanovllm.kernels import cuda_w4a16
    from nanovllm.kernels.triton_common import _num_sms
    from nanovllm.kernels.triton_w4a16 import fits, linear_w4a16_triton, w4a16_config
    out, swept = [], []
    for name, (n, k) in INT4_SHAPES.items():
        silu = name == "gate_up"
        dense = [torch.randn(n, k, device=DEV) / k ** 0.5 for _ in range(4)]
        packed = [int4_quant.quantize(w, INT4_GROUP) for w in dense]
        bf16 = [w.bfloat16() for w in dense]
        nbytes = n * k // 2 + 3 * n * int4_quant.num_groups(k, INT4_GROUP)
        for m in rows:
            x = torch.randn(m, k, device=DEV, dtype=BF16)
            err = rel_err(ops.linear_int4(x, *packed[0], INT4_GROUP, silu_mul=silu),
                          reference.linear_int4_reference(x, *packed[0], INT4_GROUP, None, None, silu))
            us = graph_us([lambda p=p: ops.linear_int4(x, *p, INT4_GROUP, silu_mul=silu) for p in packed])
            base = graph_us([lambda w=w: ops.linear(x, w, None, silu) for w in bf16])
            row = dict(op=name, rows=m, err=err, us=us, bf16_us=base, floor_us=nbytes / bandwidth * 1e6)
            out.append(row)
            table.append(f"| {name} | {m} | {us:.1f} | {base:.1f} | {row['floor_us']:.1f} | {err:.1e} |")
        for m in sweep:
            x = torch.randn(m, k, device=DEV, dtype=BF16)
            tiled = (MatmulConfig(16 if m <= 16 else 32 if m <= 32 else 64, bn, 128, split_k=s, num_stages=st)
                     for bn in (32, 64, 128) for s in (1, 2, 4, 8, 16) for st in (2, 4))
            calls = {_short(c): lambda p, c=c: linear_w4a16_triton(x, *p, INT4_GROUP, None, None, c, silu)
                     for c in tiled if fits(c, k, INT4_GROUP)}
            if cuda_w4a16.usable(x, *packed[0], INT4_GROUP):
                calls["cuda mma"] = lambda p: cuda_w4a16.linear_w4a16_cuda(x, *p, INT4_GROUP, None, None, silu)
            want = reference.linear_int4_reference(x, *packed[0], INT4_GROUP, None, None, silu)
            errs = {label: rel_err(f(packed[0]), want) for label, f in calls.items()}
            times = {label: graph_us([lambda p=p, f=f: f(p) for p in packed]) for label, f in calls.items()}
            picked = _short(w4a16_config(m, n // 2 if silu else n, k, INT4_GROUP, _num_sms(x.device)))
            best = min(times, key=times.get)
            swept.append(dict(op=name, rows=m, best=best, best_us=times[best], picked=picked,
                              picked_us=times.get(picked), all=times, rel_err=errs))
            tiles.append(f"| {name} | {m} | {best}: {times[best]:.1f} | {picked}: {times.get(picked, math.nan):.1f} |")
    return out, swept


def _short(cfg: MatmulConfig) -> str:
    return f"{cfg.block_m}x{cfg.block_n}x{cfg.block_k} split {cfg.split_k} s{cfg.num_stages} w{cfg.num_warps}"


def int4_experts(tokens: list[int], bandwidth: float, table: list) -> list[dict]:
    e, top_k, h, i = INT4_MOE
    w13 = torch.randn(e, 2 * i, h, device=DEV) / h ** 0.5
    w2 = torch.randn(e, h, i, device=DEV) / i ** 0.5
    (q13, s13, z13), (q2, s2, z2) = int4_quant.quantize(w13, INT4_GROUP), int4_quant.quantize(w2, INT4_GROUP)
    b13, b2 = w13.bfloat16(), w2.bfloat16()
    out = []
    for t in tokens:
        x, logits = torch.randn(t, h, device=DEV).bfloat16(), torch.randn(t, e, device=DEV).bfloat16()
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
    tiles = ["| op | rows | best (rows x BLOCK_N x BLOCK_K, split, stages, warps): us | Triton's pick: us |",
             "|---|---|---|---|"]
    rows, swept = int4_projections(positive_ints(args.rows, "--rows"), positive_ints(args.sweep, "--sweep")
                                   if args.sweep else [], bandwidth, table, tiles)
    rows += int4_experts(positive_ints(args.tokens, "--tokens"), bandwidth, table)
    print("\n".join(table + (tiles if swept else [])))
    failed = [r for r in rows if not r["err"] < 2e-2]
    write_json("int4_kernel.json", {"device": torch.cuda.get_device_name(), "rows": rows, "failed": failed,
                                    "sweep": swept})
    print(f"checks: {len(rows) - len(failed)}/{len(rows)} ok")
    return 1 if failed else 0


def delta_sweep(bandwidth: float) -> list[dict]:
    """``--delta``: the recurrent delta rule of a decode step (Qwen3.5-35B-A3B's GDN heads: HK 16, HV 32, 128 x
    128 float32 state) at 64 and 256 rows, for each value block and warp count, checked against the default."""
    from nanovllm.kernels.linear_attention.triton_kernels import gated_delta_rule_recurrent as rule
    rows, (hk, hv, d) = [], (16, 32, 128)
    for b in (64, 256):
        sets = []
        for _ in range(copies(b * hv * d * d * 4 * 2)):
            state = torch.randn(b + 1, hv, d, d, device=DEV) * 0.1
            qkv = [torch.randn(b, h, d, device=DEV, dtype=BF16) for h in (hk, hk, hv)]
            gb = [-torch.rand(b, hv, device=DEV), torch.rand(b, hv, device=DEV)]
            sets.append((*qkv, *gb, state, torch.arange(1, b + 1, device=DEV, dtype=torch.int32),
                         torch.arange(b + 1, device=DEV, dtype=torch.int32), torch.full((b,), 9, device=DEV,
                                                                                         dtype=torch.int32)))
        want = rule(*[x.clone() for x in sets[0]])
        for bv in (16, 32, 64, 128):
            for warps in (1, 2, 4, 8):
                got = rule(*[x.clone() for x in sets[0]], block_v=bv, num_warps=warps)
                row = timed("delta rule decode", f"B{b} BV{bv} w{warps}", b * hv * d * d * 4 * 2,
                            [lambda a=a, bv=bv, w=warps: rule(*a, block_v=bv, num_warps=w) for a in sets], bandwidth)
                rows.append(dict(row, max_err=float((got.float() - want.float()).abs().max())))
    return rows


def lora_rows(bandwidth: float) -> list[dict]:
    """``--lora``: ``lora_add`` at 1 to 4,096 tokens on qkv, o, gate_up and down (merged projections: ranks 48 and
    32; B side by side as the pool holds it), its bytes the x, y and output rows and the adapters read; beside it
    both of its paths (per-slot kernels, stacked products: ``stacked.chosen``), the base matmul (cuBLAS), and the
    pool stacked under the weight (``lora/pool.py``): that matmul alone, then with ``lora_expand`` (checked too)."""
    from nanovllm.kernels.lora import stacked
    from nanovllm.kernels.lora.reference import lora_add_reference, lora_expand_reference
    from nanovllm.kernels.lora.triton_lora import lora_add_slots, lora_add_triton, lora_expand_triton
    from nanovllm.lora.pool import fold_rows
    rows, slots_n = [], 9
    for name, k, n, r in (("qkv", 4096, 6144, 48), ("o", 4096, 4096, 16), ("gate_up", 4096, 24576, 32),
                          ("down", 12288, 4096, 16)):
        a = torch.randn(slots_n, r, k, device=DEV, dtype=BF16) / k ** 0.5
        b = (torch.randn(n, slots_n, r, device=DEV, dtype=BF16) * 0.01).permute(1, 0, 2)
        w = torch.randn(n, k, device=DEV, dtype=BF16)
        fold = torch.cat([w, w.new_zeros(fold_rows(n, slots_n * r) - n - slots_n * r, k), a.reshape(slots_n * r, k)])
        scaling = torch.full((slots_n,), 2.0, device=DEV)
        for t in (1, 2, 4, 8, 16, 64, 256, 4096):
            x, y = torch.randn(t, k, device=DEV, dtype=BF16), torch.randn(t, n, device=DEV, dtype=BF16)
            slots = torch.arange(1, t + 1, device=DEV) % slots_n  # one token: slot 1
            err = rel_err(lora_add_triton(y, x, slots, a, b, scaling) - y,  # the added products
                          lora_add_reference(y, x, slots, a, b, scaling) - y)
            nbytes = 2 * (t * k + 2 * t * n + min(t, slots_n - 1) * r * (k + n))
            paths = {p: timed(f"lora_add {p}", f"{name} T={t}", nbytes,
                              [lambda f=f: f(y, x, slots, a, b, scaling)] * 5, bandwidth)
                     for p, f in (("per slot", lora_add_slots), ("stacked", stacked.lora_add_stacked))}
            row = paths["stacked" if stacked.chosen(x, a, n) else "per slot"]  # the path lora_add_triton takes
            base = timed("base matmul", f"{name} T={t}", 2 * (n * k + t * k + t * n),
                         [lambda: torch.nn.functional.linear(x, w)] * 5, bandwidth)
            z, c = torch.nn.functional.linear(x, fold), fold.shape[0] - slots_n * r  # base outputs; shrinks at c..
            fold_err = rel_err(lora_expand_triton(z[:, :n], z[:, c:], slots, b, scaling) - z[:, :n],
                               lora_expand_reference(z[:, :n], z[:, c:], slots, b, scaling) - z[:, :n])
            alone = timed("stacked matmul", f"{name} T={t}", 2 * (fold.numel() + t * k + t * fold.shape[0]),
                          [lambda: torch.nn.functional.linear(x, fold)] * 5, bandwidth)
            stack = timed("matmul + lora_expand", f"{name} T={t}", 2 * (fold.numel() + t * k + t * n),
                          [lambda: (lambda z: lora_expand_triton(z[:, :n], z[:, c:], slots, b, scaling))(
                              torch.nn.functional.linear(x, fold))] * 5, bandwidth)
            rows.append(dict(row, kernel="lora_add", rel_err=err, per_slot_us=paths["per slot"]["us"],
                             stacked_us=paths["stacked"]["us"], base_us=base["us"], folded_us=stack["us"],
                             folded_matmul_us=alone["us"], folded_rel_err=fold_err))
    return rows


def main():
    import triton
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--int4", action="store_true", help="the int4 kernels instead (checked against their twins)")
    p.add_argument("--rows", default="1,16,64,256", help="--int4: projection row counts")
    p.add_argument("--tokens", default="16,256", help="--int4: MoE token counts")
    p.add_argument("--sweep", default="", help="--int4: row counts at which to time every candidate tile")
    p.add_argument("--delta", action="store_true", help="sweep the decode delta rule's blocks instead")
    p.add_argument("--lora", action="store_true", help="the multi-LoRA op instead")
    args = p.parse_args()
    if args.int4:
        sys.exit(int4_main(args))
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(DEV)
    print(f"copy bandwidth (read + write): {bandwidth / 1e9:.0f} GB/s")
    print("| kernel | case | us | GB/s | of copy |\n|---|---|---|---|---|")
    mode = "delta" if args.delta else "lora" if args.lora else ""
    rows = {"delta": delta_sweep, "lora": lora_rows, "": timing_rows}[mode](bandwidth)
    write_json(f"{mode}_sweep.json" if mode else "kernel_bench.json", {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "copy_gbps": round(bandwidth / 1e9, 1), "timing": rows})


if __name__ == "__main__":
    main()
