"""GPU check and benchmark of the Triton attention kernels (nanovllm/kernels/triton_attention.py).

    PYTHONPATH=. python benchmarks/attention_kernels.py [--no-sweep]

(a) correctness against the pure-PyTorch twins (reference.py): head_dim 64/128, GQA 1/2/4/8, block sizes
    16/64/256, contexts 1..16k, batch 1..256 with padded rows (context 0, slot -1) and mid-block ends, fp32 and
    bf16; outputs are poisoned with NaN first (torch.empty is patched), so an unwritten element fails.
(b) device-to-device copy bandwidth, then decode attention bandwidth (bytes = K+V of every context + q + out)
    as a fraction of it, at bs256 x ctx1k, bs64 x ctx4k, bs8 x ctx16k (and bs128 with contexts mixed in 1..4k),
    Qwen3-0.6B shape (Hq=16, Hkv=8, D=128, bf16), per KV block size 16/64/256, timed as CUDA-graph replays
    (median of triton.testing.do_bench); the default config is timed twice (the spread is the noise).
(c) prefill TFLOP/s at 16 sequences x 1k tokens (and 16 x 512 new tokens on a 1.5k cached prefix), with
    FLOPs = 4 * D * Hq * sum over query tokens of (causal keys attended = position + 1).
Writes $OUT/attention_kernels.json and $OUT/attention_kernels.md (OUT defaults to ./results); prints the table last.
"""
import argparse
import contextlib
import json
import math
import os
import time
import traceback

import torch
import triton

from nanovllm.kernels import reference as ref
from nanovllm.kernels import triton_attention as ta
from nanovllm.kernels.triton_decode import DecodeVariant

DEV = "cuda"
T0 = time.time()
RESULTS = {"correctness": [], "copy": {}, "decode": [], "decode_sweep": [], "prefill": [], "errors": []}


def rel_err(out, want):
    out, want = out.double(), want.double()
    return ((out - want).norm() / want.norm().clamp_min(1e-30)).item()


@contextlib.contextmanager
def poisoned_empty():
    """Every float tensor made by torch.empty starts as NaN, so outputs the kernels fail to write show up."""
    orig = torch.empty

    def empty(*args, **kwargs):
        t = orig(*args, **kwargs)
        if t.is_floating_point():
            t.fill_(float("nan"))
        return t
    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = orig


def make_cache(ctx_lens, num_kv_heads, head_dim, block_size, dtype, spare=3):
    """Random K/V caches and shuffled (non-contiguous) block tables; rows of context 0 keep an all-zero table."""
    per_seq = [triton.cdiv(c, block_size) for c in ctx_lens]
    width = max(1, max(per_seq))
    num_blocks = sum(per_seq) + spare
    perm = torch.randperm(num_blocks, dtype=torch.int32)
    tables = torch.zeros(len(ctx_lens), width, dtype=torch.int32)
    at = 0
    for b, n in enumerate(per_seq):
        tables[b, :n] = perm[at:at + n]
        at += n
    shape = (num_blocks, num_kv_heads, block_size, head_dim)
    k = torch.randn(shape, dtype=dtype, device=DEV)
    v = torch.randn(shape, dtype=dtype, device=DEV)
    return k, v, tables.to(DEV), torch.tensor(ctx_lens, dtype=torch.int32, device=DEV)


def tol(dtype):
    return 1e-3 if dtype == torch.float32 else 2e-2


def record(kind, desc, dtype, out, want):
    err = rel_err(out, want)
    finite = bool(torch.isfinite(out).all().item())
    ok = finite and err < tol(dtype)
    RESULTS["correctness"].append(dict(kind=kind, case=desc, dtype=str(dtype).split(".")[-1], rel_err=err,
                                       finite=finite, ok=ok))
    print(f"  {'ok  ' if ok else 'FAIL'} {kind:8s} {desc:60s} rel {err:.2e} finite {finite}", flush=True)


def check_store():
    for dt, bs, hkv, d in [(torch.bfloat16, 16, 8, 128), (torch.bfloat16, 64, 2, 64), (torch.float32, 256, 4, 128)]:
        num_blocks, T = 40, 300
        qkv = torch.randn(T, (2 * hkv + 4) * d, dtype=dt, device=DEV)  # key/value as strided views
        key = qkv[:, 4 * d:(4 + hkv) * d].view(T, hkv, d)
        value = qkv[:, (4 + hkv) * d:].view(T, hkv, d)
        slots = torch.randperm(num_blocks * bs)[:T].to(torch.int32)
        slots[torch.rand(T) < 0.15] = -1
        slots = slots.to(DEV)
        k0 = torch.full((num_blocks, hkv, bs, d), float("nan"), dtype=dt, device=DEV)
        v0 = torch.randn_like(k0)
        kt, vt, kr, vr = k0.clone(), v0.clone(), k0.clone(), v0.clone()
        ta.store_kv_triton(key, value, kt, vt, slots)
        ref.store_kv_reference(key, value, kr, vr, slots)
        same = torch.equal(kt.nan_to_num(7.0), kr.nan_to_num(7.0)) and torch.equal(vt, vr)
        RESULTS["correctness"].append(dict(kind="store", case=f"bs{bs} Hkv{hkv} D{d}", dtype=str(dt).split(".")[-1], rel_err=0.0 if
                                           same else 1.0, finite=True, ok=same))
        print(f"  {'ok  ' if same else 'FAIL'} store    bs{bs} Hkv{hkv} D{d} {dt} exact={same}", flush=True)


def check_decode():
    g = torch.Generator().manual_seed(1)
    rnd = lambda n, hi: torch.randint(1, hi + 1, (n,), generator=g).tolist()
    cases = [  # (D, group, Hkv, block_size, dtype, contexts, forced splits)
        (128, 1, 4, 16, torch.float32, [0, 1, 15, 16, 17, 1000], 5),
        (128, 2, 8, 16, torch.bfloat16, [0 if i % 17 == 0 else c for i, c in enumerate(rnd(256, 2048))], None),
        (64, 4, 2, 64, torch.bfloat16, rnd(29, 4096) + [63, 64, 128], 7),
        (128, 8, 2, 256, torch.float32, [16384, 255, 257, 0], None),
        (64, 8, 1, 16, torch.float32, rnd(8, 16384), 3),
        (128, 4, 4, 64, torch.bfloat16, [16384], None),
        (128, 2, 8, 256, torch.bfloat16, rnd(64, 4096), 2),
        (64, 1, 8, 256, torch.bfloat16, [1, 300, 9000], None),
        (128, 2, 4, 64, torch.float32, rnd(128, 1024), None),
    ]
    for d, group, hkv, bs, dt, ctx, splits in cases:
        kc, vc, bt, cl = make_cache(ctx, hkv, d, bs, dt)
        q = torch.randn(len(ctx), group * hkv, d, dtype=dt, device=DEV)
        scale = d ** -0.5
        want = ref.decode_attention_reference(q, kc, vc, bt, cl, scale)
        desc = f"B{len(ctx)} D{d} G{group} Hkv{hkv} bs{bs} ctx<={max(ctx)}"
        with poisoned_empty():
            out = ta.decode_attention_triton(q, kc, vc, bt, cl, scale)
        record("decode", desc, dt, out, want)
        if splits:
            with poisoned_empty():
                out = ta.decode_attention_configured(q, kc, vc, bt, cl, scale, num_splits=splits)
            record("decode", desc + f" splits={splits}", dt, out, want)
    # CUDA graph: capture once, change the contexts and queries, replay.
    ctx = [1000, 0, 37, 4000]
    kc, vc, bt, cl = make_cache(ctx, 8, 128, 16, torch.bfloat16)
    q = torch.randn(4, 16, 128, dtype=torch.bfloat16, device=DEV)
    ta.decode_attention_triton(q, kc, vc, bt, cl, 0.1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = ta.decode_attention_triton(q, kc, vc, bt, cl, 0.1)
    cl.copy_(torch.tensor([5, 3999, 0, 1], dtype=torch.int32))
    q.copy_(torch.randn_like(q))
    out.fill_(float("nan"))
    graph.replay()
    record("decode", "CUDA graph replay with new context_lens", torch.bfloat16, out,
           ref.decode_attention_reference(q, kc, vc, bt, cl, 0.1))


def check_prefill():
    cases = [  # (D, group, Hkv, block_size, dtype, q_lens, cached prefix lengths)
        (128, 2, 8, 16, torch.bfloat16, [1000, 1, 37, 300], [0, 64, 500, 3796]),
        (64, 4, 2, 64, torch.float32, [5, 128, 64, 200], [0, 0, 17, 1000]),
        (128, 8, 2, 256, torch.bfloat16, [2048], [3000]),
        (128, 1, 4, 64, torch.float32, [256, 513], [0, 255]),
        (64, 2, 4, 16, torch.bfloat16, torch.randint(1, 300, (16,)).tolist(), torch.randint(0, 2000, (16,)).tolist()),
        (128, 4, 2, 256, torch.float32, [1, 1, 1], [0, 16383, 100]),
    ]
    for d, group, hkv, bs, dt, q_lens, prefix in cases:
        ctx = [a + b for a, b in zip(q_lens, prefix)]
        kc, vc, bt, cl = make_cache(ctx, hkv, d, bs, dt)
        cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
        q = torch.randn(sum(q_lens), group * hkv, d, dtype=dt, device=DEV)
        scale = d ** -0.5
        want = ref.prefill_attention_reference(q, kc, vc, cu, cl, bt, scale)
        with poisoned_empty():
            out = ta.prefill_attention_triton(q, kc, vc, cu, cl, bt, scale)
        record("prefill", f"B{len(q_lens)} D{d} G{group} bs{bs} q<={max(q_lens)} ctx<={max(ctx)}", dt, out, want)


def bench_graph(fn):
    fn()  # compile
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return triton.testing.do_bench(graph.replay, warmup=10, rep=50, return_mode="median")  # ms


def copy_bandwidth():
    n = 1 << 30  # 1 GiB each way
    x = torch.randn(n // 2, dtype=torch.bfloat16, device=DEV)
    y = torch.empty_like(x)
    ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=10, rep=100, return_mode="median")
    bw = 2 * n / ms / 1e6  # GB/s
    RESULTS["copy"] = dict(bytes=2 * n, ms=ms, GBps=bw)
    print(f"copy: {bw:.0f} GB/s", flush=True)
    return bw


DECODE_SWEEP = [(64, 4, 3), (64, 2, 4), (32, 2, 3), (128, 4, 3)]  # (block_n, num_warps, num_stages)
DECODE_SHAPES = [(256, 1024), (64, 4096), (8, 16384), (128, "mixed")]  # "mixed": contexts uniform in 1..4096


def bench_decode(copy_bw, sweep):
    hq, hkv, d, dt = 16, 8, 128, torch.bfloat16
    for batch, ctx in DECODE_SHAPES:
        lens = torch.randint(1, 4097, (batch,)).tolist() if ctx == "mixed" else [ctx] * batch
        for bs in [16, 64, 256]:
            kc, vc, bt, cl = make_cache(lens, hkv, d, bs, dt)
            q = torch.randn(batch, hq, d, dtype=dt, device=DEV)
            nbytes = sum(lens) * hkv * d * 2 * dt.itemsize + 2 * q.numel() * q.element_size()
            configs = [dict(), dict()]  # the default twice: the spread between them is the noise
            if sweep and time.time() - T0 < 200:
                if ctx != "mixed":
                    configs += [dict(block_n=n, num_warps=w, num_stages=s) for n, w, s in DECODE_SWEEP]
                configs += [dict(waves=w) for w in (4, 8)]
            for i, cfg in enumerate(configs):
                try:
                    fn = lambda: ta.decode_attention_configured(q, kc, vc, bt, cl, d ** -0.5, **cfg)
                    ms = bench_graph(fn)
                except Exception as e:  # a config that fails to compile or launch: note it and go on
                    RESULTS["errors"].append(f"decode {batch}x{ctx} bs{bs} {cfg}: {e!r}"[:500])
                    continue
                bw = nbytes / ms / 1e6
                splits = ta.decode_num_splits(batch, hkv, bt.shape[1], bs,
                                              cfg.get("block_n") or ta._decode_config(q, bs)[0], q.device,
                                              cfg.get("waves", DecodeVariant.waves))
                row = dict(batch=batch, ctx=ctx, block_size=bs, config=cfg or "default", splits=splits, us=ms * 1e3,
                           GBps=bw, frac_of_copy=bw / copy_bw)
                (RESULTS["decode"] if i == 0 else RESULTS["decode_sweep"]).append(row)
                print(f"decode bs{batch} ctx{ctx} kvblock{bs} {cfg or 'default'} splits={splits}: {ms*1e3:.1f} us "
                      f"{bw:.0f} GB/s = {bw / copy_bw:.1%} of copy", flush=True)
            del kc, vc


PREFILL_SWEEP = [(128, 64, 8, 3), (64, 32, 4, 3), (128, 128, 8, 3), (64, 64, 8, 3)]  # (m, n, warps, stages)


def bench_prefill(sweep):
    hq, hkv, d, dt = 16, 8, 128, torch.bfloat16
    for nseq, q_len, prefix in [(16, 1024, 0), (16, 512, 1536)]:
        ctx = q_len + prefix
        flops = 4 * d * hq * nseq * sum(prefix + j + 1 for j in range(q_len))
        q = torch.randn(nseq * q_len, hq, d, dtype=dt, device=DEV)
        cu = torch.arange(0, nseq + 1, dtype=torch.int32, device=DEV) * q_len
        for bs in [16, 64, 256]:
            kc, vc, bt, cl = make_cache([ctx] * nseq, hkv, d, bs, dt)
            configs = [dict()]
            if sweep and bs == 64 and time.time() - T0 < 270:
                configs += [dict(block_m=m, block_n=n, num_warps=w, num_stages=s) for m, n, w, s in PREFILL_SWEEP]
            for cfg in configs:
                try:
                    ms = bench_graph(lambda: ta.prefill_attention_configured(q, kc, vc, cu, cl, bt, d ** -0.5, **cfg))
                except Exception as e:
                    RESULTS["errors"].append(f"prefill bs{bs} {cfg}: {e!r}"[:500])
                    continue
                row = dict(seqs=nseq, q_len=q_len, prefix=prefix, block_size=bs, config=cfg or "default", us=ms * 1e3,
                           TFLOPs=flops / ms / 1e9)
                RESULTS["prefill"].append(row)
                print(f"prefill {nseq}x{q_len} prefix{prefix} kvblock{bs} {cfg or 'default'}: {ms*1e3:.1f} us "
                      f"{row['TFLOPs']:.1f} TFLOP/s", flush=True)
        if prefix == 0:  # baseline: torch SDPA on contiguous K/V (no paging), same FLOP count
            qs = torch.randn(nseq, hq, q_len, d, dtype=dt, device=DEV)
            ks, vs = torch.randn_like(qs), torch.randn_like(qs)
            f = torch.nn.functional.scaled_dot_product_attention
            ms = triton.testing.do_bench(lambda: f(qs, ks, vs, is_causal=True), warmup=10, rep=50,
                                         return_mode="median")
            RESULTS["prefill"].append(dict(seqs=nseq, q_len=q_len, prefix=0, block_size="contiguous",
                                           config="torch SDPA (baseline)", us=ms * 1e3, TFLOPs=flops / ms / 1e9))
            print(f"prefill SDPA baseline: {ms*1e3:.1f} us {flops / ms / 1e9:.1f} TFLOP/s", flush=True)


def table():
    lines = [f"device: {RESULTS['device']}, torch {torch.__version__}, triton {triton.__version__}", "",
             "| check | case | dtype | max rel err | NaN-free | ok |", "|---|---|---|---|---|---|"]
    by_kind = {}
    for r in RESULTS["correctness"]:
        by_kind.setdefault((r["kind"], r["dtype"]), []).append(r)
    for (kind, dt), rows in by_kind.items():
        worst = max(rows, key=lambda r: r["rel_err"])
        lines.append(f"| {kind} | {len(rows)} cases (worst: {worst['case']}) | {dt} | {worst['rel_err']:.2e} | "
                     f"{all(r['finite'] for r in rows)} | {all(r['ok'] for r in rows)} |")
    c = RESULTS["copy"]
    lines += ["", f"copy bandwidth (read+write): {c.get('GBps', float('nan')):.0f} GB/s", "",
              "| decode (Qwen3-0.6B, bf16) | kv block 16 | kv block 64 | kv block 256 | best sweep config |",
              "|---|---|---|---|---|"]
    for batch, ctx in DECODE_SHAPES:
        cells = []
        for bs in [16, 64, 256]:
            r = [x for x in RESULTS["decode"] if (x["batch"], x["ctx"], x["block_size"]) == (batch, ctx, bs)]
            cells.append(f"{r[0]['frac_of_copy']:.1%} ({r[0]['us']:.0f} us, {r[0]['splits']} splits)" if r else "-")
        sw = [x for x in RESULTS["decode_sweep"] + RESULTS["decode"] if (x["batch"], x["ctx"]) == (batch, ctx)]
        best = max(sw, key=lambda x: x["frac_of_copy"]) if sw else None
        bcell = f"{best['frac_of_copy']:.1%} kvblock{best['block_size']} {best['config']}" if best else "-"
        name = f"bs{batch} x ctx{ctx}" if ctx != "mixed" else f"bs{batch} x ctx 1..4k mixed"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {bcell} |")
    lines += ["", "| prefill (Hq16 Hkv8 D128 bf16) | kv block | config | us | TFLOP/s |", "|---|---|---|---|---|"]
    for r in RESULTS["prefill"]:
        lines.append(f"| {r['seqs']}x{r['q_len']} prefix {r['prefix']} | {r['block_size']} | {r['config']} | "
                     f"{r['us']:.0f} | {r['TFLOPs']:.1f} |")
    if RESULTS["errors"]:
        lines += ["", "errors:"] + [f"- {e}" for e in RESULTS["errors"]]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--no-sweep", action="store_true", help="time the default configs only")
    args = parser.parse_args()
    out_dir = os.environ.get("OUT", "results")
    os.makedirs(out_dir, exist_ok=True)
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    RESULTS["device"] = f"{props.name} ({props.multi_processor_count} SMs)"
    for name, step in [("store", check_store), ("decode", check_decode), ("prefill", check_prefill),
                       ("copy", copy_bandwidth)]:
        print(f"== {name} ({time.time() - T0:.0f} s)", flush=True)
        try:
            bw = step()
        except Exception:
            RESULTS["errors"].append(f"{name}: {traceback.format_exc()[-1500:]}")
            print(traceback.format_exc(), flush=True)
    bw = RESULTS["copy"].get("GBps", float("nan"))
    for name, step in [("decode timing", lambda: bench_decode(bw, not args.no_sweep)),
                       ("prefill timing", lambda: bench_prefill(not args.no_sweep))]:
        print(f"== {name} ({time.time() - T0:.0f} s)", flush=True)
        try:
            step()
        except Exception:
            RESULTS["errors"].append(f"{name}: {traceback.format_exc()[-1500:]}")
            print(traceback.format_exc(), flush=True)
    RESULTS["seconds"] = time.time() - T0
    md = table()
    with open(os.path.join(out_dir, "attention_kernels.json"), "w") as f:
        json.dump(RESULTS, f, indent=1, default=str)
    with open(os.path.join(out_dir, "attention_kernels.md"), "w") as f:
        f.write(md + "\n")
    print(f"\n(total {RESULTS['seconds']:.0f} s)\n" + md, flush=True)


if __name__ == "__main__":
    main()
