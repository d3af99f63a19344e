"""Decode attention on the throughput benchmark's mixed context lengths: every variant, as % of copy bandwidth.

    PYTHONPATH=. python benchmarks/decode_mixed.py            (--smoke: a CPU interpreter run of the script itself)

Shape: Qwen3-0.6B (16 query heads, 8 KV heads, head_dim 128, bf16), KV block size 64, block tables 64 wide
(max_model_len 4096).  Batches 256/128/64/32/16/4 with context lengths drawn uniform in [100, 2048] (seed 0, as
bench.py's running sequences: prompts 100-1024 plus up to 1024 generated), and the uniform bs256 x ctx1024 case.

For each shape and variant (nanovllm/kernels/triton_decode.py; ``default`` is what decode_attention_triton runs,
i.e. NANOVLLM_DECODE_VARIANT or DEFAULT_VARIANT): the calls are captured in one CUDA graph, cycling over enough
per-"layer" KV caches (distinct tensors) that a call never finds its KV in the 50 MB L2, and the graph is replayed
many times between CUDA events.  bytes = K+V actually read (sum of contexts x Hkv x D x 2 x 2 B) + q + out;
GB/s = bytes / time; % copy = GB/s over a device-to-device copy (read + write bytes / time), measured first.
Before timing, each variant is checked against reference.py (bs32 mixed) and through a CUDA graph captured with
one set of lengths and replayed with another; a FAIL there means: don't use that variant.
Prints progress, a table, a per-variant summary and one line ``DECODE_MIXED_JSON {...}``; writes
$OUT/decode_mixed.json (OUT defaults to ./results).  Budget: < 90 s on an H100 (extra sweeps stop at 70 s).
``--smoke``: TRITON_INTERPRET=1 CPU run at one tiny shape, to check the script itself (timings meaningless).
"""
import json
import os
import time

import torch
import triton

from nanovllm.kernels import reference as ref
from nanovllm.kernels import triton_decode as td

DEV = "cuda"
HQ, HKV, D, DT, BLOCK, WIDTH = 16, 8, 128, torch.bfloat16, 64, 64
SHAPES = [(256, "mixed"), (128, "mixed"), (64, "mixed"), (32, "mixed"), (16, "mixed"), (4, "mixed"), (256, 1024)]
VARIANTS = [(name, dict(variant=name)) for name in ["legacy", "chunk", "chunk_rev", "streamk"]]
EXTRAS = [  # launch-parameter sweeps around the variants (skipped past the time budget)
    ("chunk c4", dict(variant="chunk", chunk_tiles=4)), ("chunk c16", dict(variant="chunk", chunk_tiles=16)),
    ("streamk pps6", dict(variant="streamk", programs_per_sm=6)),
    ("streamk pps24", dict(variant="streamk", programs_per_sm=24)),
    ("streamk w4", dict(variant="streamk", num_warps=4)), ("chunk w4", dict(variant="chunk", num_warps=4)),
    ("streamk st2", dict(variant="streamk", num_stages=2)),
]
T0 = time.time()


def log(msg):
    print(f"[{time.time() - T0:5.1f}s] {msg}", flush=True)


def lengths(batch, ctx):
    if ctx == "mixed":
        gen = torch.Generator().manual_seed(0)
        return torch.randint(100, 2049, (batch,), generator=gen).tolist()
    return [ctx] * batch


def make_layer(lens, seed):
    """One layer's K/V cache (just big enough) and a shuffled block table of width WIDTH."""
    gen = torch.Generator().manual_seed(seed)
    per_seq = [triton.cdiv(c, BLOCK) for c in lens]
    num_blocks = sum(per_seq) + 1
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    tables = torch.zeros(len(lens), WIDTH, dtype=torch.int32)
    at = 0
    for b, n in enumerate(per_seq):
        tables[b, :n] = perm[at:at + n]
        at += n
    k = torch.randn((num_blocks, HKV, BLOCK, D), dtype=DT, device=DEV)
    return k, torch.randn_like(k), tables.to(DEV)


def copy_bandwidth():
    n = 1 << (30 if DEV == "cuda" else 22)
    x = torch.empty(n // 2, dtype=torch.bfloat16, device=DEV).normal_()
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    return 2 * n * 20 / (elapsed_ms(lambda: [y.copy_(x) for _ in range(20)]) * 1e6)  # GB/s, read + write


def capture(fn):
    """(replay, fn's result): ``fn`` captured in a CUDA graph (on CPU, a smoke run: replay just calls it)."""
    if DEV == "cpu":
        result = fn()
        return (lambda: result.copy_(fn()) if result is not None else fn()), result
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        result = fn()
    return graph.replay, result


def elapsed_ms(body):
    if DEV == "cpu":
        t = time.perf_counter()
        body()
        return (time.perf_counter() - t) * 1e3
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    body()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop)


def time_graph(fn, calls_per_graph):
    """Microseconds per call: ``fn`` (which makes ``calls_per_graph`` calls) captured once, replayed in rounds."""
    replay, _ = capture(fn)
    replay()
    reps = 1 if DEV == "cpu" else max(5, min(400, int(30.0 / max(elapsed_ms(replay), 1e-3))))  # ~30 ms a round
    rounds = [elapsed_ms(lambda: [replay() for _ in range(reps)]) * 1e3 / (reps * calls_per_graph)
              for _ in range(1 if DEV == "cpu" else 5)]
    return sorted(rounds)[len(rounds) // 2]


def rel_err(out, want):
    out, want = out.double(), want.double()
    return ((out - want).norm() / want.norm().clamp_min(1e-30)).item() if torch.isfinite(out).all() else float("inf")


def check(label, kw, batch=32):
    """Reference check at bs32 mixed, then capture with one set of lengths and replay with another."""
    lens = lengths(batch, "mixed")
    lens[batch // 2] = 0
    k, v, tables = make_layer(lens, 1)
    cl = torch.tensor(lens, dtype=torch.int32, device=DEV)
    q = torch.randn(batch, HQ, D, dtype=DT, device=DEV)
    scale = D ** -0.5
    out = td.decode_attention_configured(q, k, v, tables, cl, scale, **kw)
    rels = [rel_err(out, ref.decode_attention_reference(q, k, v, tables, cl, scale))]
    replay, out = capture(lambda: td.decode_attention_configured(q, k, v, tables, cl, scale, **kw))
    new = [min(c, 64 * (i % 5) + i % 2) if i % 3 else c for i, c in enumerate(lens)]  # shorter, at tile edges
    cl.copy_(torch.tensor(new, dtype=torch.int32))
    q.copy_(torch.randn_like(q))
    replay()
    rels.append(rel_err(out, ref.decode_attention_reference(q, k, v, tables, cl, scale)))
    rel = max(rels)
    ok = rel < 2e-2
    log(f"check {label:14s} rel err {rel:.1e} (reference and graph replay with new lengths): {'ok' if ok else 'FAIL'}")
    return ok


def run(smoke=False):
    """The benchmark; ``smoke``: a CPU run under TRITON_INTERPRET=1 at one tiny shape (checks the script only)."""
    global DEV, SHAPES
    if smoke:
        DEV, SHAPES = "cpu", [(2, "mixed")]
    torch.manual_seed(0)
    props = torch.cuda.get_device_properties(0) if DEV == "cuda" else None
    name, sms = (props.name, props.multi_processor_count) if props else ("cpu (interpreter smoke run)", 0)
    default = td.decode_variant()
    log(f"{name} ({sms} SMs); default variant: {default} "
        f"(NANOVLLM_DECODE_VARIANT={os.environ.get('NANOVLLM_DECODE_VARIANT', '')!r}, "
        f"DEFAULT_VARIANT={td.DEFAULT_VARIANT!r})")
    copy_bw = copy_bandwidth()
    log(f"copy bandwidth {copy_bw:.0f} GB/s (read + write)")
    checks = {label: check(label, kw, 4 if smoke else 32) for label, kw in VARIANTS}
    rows = []
    for batch, ctx in SHAPES:
        lens = lengths(batch, ctx)
        kv_bytes = sum(lens) * HKV * D * 2 * DT.itemsize
        nbytes = kv_bytes + 2 * batch * HQ * D * DT.itemsize
        n_layers = max(1, min(28, triton.cdiv(150 << 20, kv_bytes)))  # > 3x L2 per graph replay
        layers = [make_layer(lens, seed) for seed in range(n_layers)]
        cl = torch.tensor(lens, dtype=torch.int32, device=DEV)
        q = torch.randn(batch, HQ, D, dtype=DT, device=DEV)
        calls = max(n_layers, 4)
        configs = VARIANTS + (EXTRAS if time.time() - T0 < 70 else [])
        for label, kw in configs:
            def fn():
                for i in range(calls):
                    k, v, tables = layers[i % n_layers]
                    td.decode_attention_configured(q, k, v, tables, cl, D ** -0.5, **kw)
            try:
                us = time_graph(fn, calls)
            except Exception as e:  # a launch config that fails to compile: note it and go on
                log(f"bs{batch} ctx {ctx} {label}: ERROR {e!r}"[:300])
                continue
            gbps = nbytes / us / 1e3
            row = dict(batch=batch, ctx=ctx, variant=label, kwargs=kw, kv_bytes=kv_bytes, bytes=nbytes,
                       us=round(us, 2), GBps=round(gbps, 1), pct_copy=round(100 * gbps / copy_bw, 1))
            rows.append(row)
            log(f"bs{batch:3d} ctx {str(ctx):6s} {label:14s} {us:8.1f} us {gbps:6.0f} GB/s {row['pct_copy']:5.1f}% "
                f"of copy ({nbytes / 1e6:.0f} MB, {n_layers} layer caches)")
        del layers
        torch.cuda.empty_cache()
    report(rows, copy_bw, default, checks, name, sms)


def report(rows, copy_bw, default, checks, name, sms):
    labels = list(dict.fromkeys(r["variant"] for r in rows))
    shapes = list(dict.fromkeys((r["batch"], r["ctx"]) for r in rows))
    cell = {(r["batch"], r["ctx"], r["variant"]): r for r in rows}
    print(f"\n% of copy bandwidth ({copy_bw:.0f} GB/s), us per call in brackets; * = default ({default})")
    print(f"{'shape':16s}" + "".join(f"{(lb + ('*' if lb == default else '')):>17s}" for lb in labels))
    for b, c in shapes:
        line = f"{f'bs{b} ctx {c}':16s}"
        for lb in labels:
            r = cell.get((b, c, lb))
            txt = f"{r['pct_copy']:.1f}% ({r['us']:.0f})" if r else "-"
            line += f"{txt:>17s}"
        print(line)
    summary = {}
    for lb in labels:
        big = [cell[(b, c, lb)]["pct_copy"] for b, c in shapes if c == "mixed" and b >= 64 and (b, c, lb) in cell]
        if big:
            summary[lb] = round(sum(big) / len(big), 1)
    print("\nmean % of copy over mixed bs >= 64 (target >= 93): "
          + ", ".join(f"{lb} {v}" for lb, v in sorted(summary.items(), key=lambda kv: -kv[1])))
    print("checks: " + ", ".join(f"{k} {'ok' if v else 'FAIL'}" for k, v in checks.items()))
    print(f"default variant now: {default} (set NANOVLLM_DECODE_VARIANT to one of {sorted(td.DECODE_VARIANTS)})")
    result = dict(device=name, sms=sms, copy_GBps=round(copy_bw, 1),
                  default_variant=default, checks=checks, mean_pct_copy_mixed_bs_ge_64=summary, rows=rows,
                  seconds=round(time.time() - T0, 1))
    print("DECODE_MIXED_JSON " + json.dumps(result), flush=True)
    out_dir = os.environ.get("OUT", "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "decode_mixed.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    import sys
    run(smoke="--smoke" in sys.argv)
