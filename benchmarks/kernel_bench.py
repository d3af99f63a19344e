"""The fused Triton kernels' speed on a GPU against the copy ceiling (their exactness is tests/gpu/test_kernels.py).

    python -m benchmarks.kernel_bench        # prints a table, writes $OUT/kernel_bench.json
    python -m benchmarks.kernel_bench --int4 [--rows 1,16,64,256] [--tokens 16,256] [--sweep 1,16]
                                             # writes $OUT/int4_kernel.json

Each case is timed as CUDA-graph replays, each call on its own buffers where one would fit in L2: the bytes a
kernel must move over its time, as a share of the device-to-device copy bandwidth.  Decode attention at bench's
shapes (Qwen3-0.6B heads, bf16, KV block 64; over a bf16 and an FP8 cache, half the KV bytes), the sampler over
Qwen3's vocabulary, and each tuned matmul of this GPU's dispatch table at the largest batch its Triton config serves.
``--int4``: the int4 kernels (``kernel_bench_int4.py``).
``--delta``: the decode delta rule's value block and warps, against its float32 state's read and write.
``--lora``: the multi-LoRA op on Qwen3-8B's projections (rank 16 on 8 of 9 slots, tokens round robin), checked
against its twin, beside the base product's bf16 matmul of the same tokens.
"""
import argparse
import math
import sys

import torch

from benchmarks.common import copy_bandwidth, graph_us, rel_err, write_json

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
        from benchmarks.kernel_bench_int4 import int4_main
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
