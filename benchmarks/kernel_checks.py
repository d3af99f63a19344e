"""The fused Triton kernels on a GPU: exact against their PyTorch twins, and fast against the copy ceiling.

    python benchmarks/kernel_checks.py [--no-timing]   # prints two tables, writes $OUT/kernel_checks.json

Exactness (CI runs these kernels only under the Triton interpreter, whose bf16 casts truncate where a GPU
rounds to nearest).  Every output is first poisoned with NaN (``torch.empty`` is patched), so an element a
kernel fails to write fails its check.

* ``store_kv``: bit-exact, padded slots (-1) skipped, key and value strided views of one qkv tensor.
* ``decode`` / ``prefill`` attention: relative error against ``reference.py`` below 1e-3 (fp32) or 2e-2
  (bf16), over head_dim 64/128, GQA groups 1-8, KV blocks 16/64/256, contexts 0-16k, cached prefixes; and a
  decode launch captured in a CUDA graph, replayed with new context lengths.
* ``rope_store``: q/k-norm + rope + KV store against the torch code, Qwen3-0.6B heads, bf16: exact without the
  norm; with it under 1e-4 of the elements may differ (the norm's float32 sum rounds one bf16 ulp the other way).
* ``matmul``: every configuration of this GPU's dispatch table against ``linear_reference`` in float32 (relative
  error < 1e-2).
* ``sampler``: the same tokens as the torch reference with and without its tile skip, half the rows greedy
  and half at temperature 0.6; and the skip's bound above the kernel's noise for all 2**23 uniforms.

Timing (CUDA-graph replays, each call on its own buffers where one would fit in L2): the bytes a kernel must
move over its time, as a share of the device-to-device copy bandwidth.  Decode attention at bench's shapes
(Qwen3-0.6B heads, bf16, KV block 64), the sampler over Qwen3's vocabulary, and each tuned matmul at the
largest batch its Triton config serves.  Exits non-zero if a check fails.
"""
import argparse
import contextlib
import math
import os
import sys

import torch
import triton

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import copy_bandwidth, graph_us, write_json  # noqa: E402
from nanovllm.kernels import matmul_configs  # noqa: E402
from nanovllm.kernels import reference as ref  # noqa: E402
from nanovllm.kernels.triton_attention import prefill_attention_triton, store_kv_triton  # noqa: E402
from nanovllm.kernels.triton_decode import decode_attention_triton  # noqa: E402
from nanovllm.kernels.triton_matmul import linear_triton  # noqa: E402
from nanovllm.kernels.triton_rope_store import rope_store_kv_triton  # noqa: E402
from nanovllm.kernels.triton_sampler import gumbel_argmax_triton, gumbel_bound_triton  # noqa: E402
from nanovllm.kernels.sampling import gumbel_argmax_reference, uniform_from_bits  # noqa: E402
from nanovllm.layers.rotary import RotaryEmbedding  # noqa: E402

DEV = "cuda"
BF16, FP32 = torch.bfloat16, torch.float32
L2_SAFE_BYTES = 256 << 20  # buffers of one timed graph add up to at least this (several times any L2)
CHECKS: list[dict] = []


def check(kind: str, case: str, error: float, ok: bool) -> None:
    CHECKS.append({"check": kind, "case": case, "error": error, "ok": bool(ok)})
    print(f"  {'ok  ' if ok else 'FAIL'} {kind:10s} {case:58s} {error:.2e}", flush=True)


def rel_err(out, want) -> float:
    out, want = out.double(), want.double()
    return ((out - want).norm() / want.norm().clamp_min(1e-30)).nan_to_num(math.inf).item()


@contextlib.contextmanager
def poisoned_empty():
    """Every float tensor made by torch.empty starts as NaN, so outputs a kernel fails to write show up."""
    plain = torch.empty

    def empty(*args, **kwargs):
        t = plain(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t
    torch.empty = empty
    try:
        yield
    finally:
        torch.empty = plain


def make_cache(ctx_lens, num_kv_heads, head_dim, block_size, dtype, spare=3):
    """Random K/V caches and block tables over shuffled blocks; rows of context 0 keep an all-zero table."""
    per_seq = [triton.cdiv(c, block_size) for c in ctx_lens]
    used = sum(per_seq)
    perm = torch.randperm(used + spare, dtype=torch.int32)
    rows = list(perm[:used].split(per_seq)) + [torch.zeros(1, dtype=torch.int32)]  # the last: width >= 1
    tables = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)[:-1]
    k, v = (torch.randn(used + spare, num_kv_heads, block_size, head_dim, dtype=dtype, device=DEV) for _ in range(2))
    return k, v, tables.to(DEV), torch.tensor(ctx_lens, dtype=torch.int32, device=DEV)


def attention_ok(kind, case, dtype, out, want) -> None:
    err = rel_err(out, want)
    check(kind, f"{case} {str(dtype)[6:]}", err, err < (1e-3 if dtype == FP32 else 2e-2))


def check_store():
    for dt, bs, hkv, d in [(BF16, 16, 8, 128), (BF16, 64, 2, 64), (FP32, 256, 4, 128)]:
        num_blocks, tokens = 40, 300
        qkv = torch.randn(tokens, (2 * hkv + 4) * d, dtype=dt, device=DEV)
        key, value = qkv[:, 4 * d:(4 + hkv) * d].view(tokens, hkv, d), qkv[:, (4 + hkv) * d:].view(tokens, hkv, d)
        slots = torch.randperm(num_blocks * bs)[:tokens].to(torch.int32)
        slots[torch.rand(tokens) < 0.15] = -1
        slots = slots.to(DEV)
        k0 = torch.full((num_blocks, hkv, bs, d), float("nan"), dtype=dt, device=DEV)
        v0 = torch.randn_like(k0)
        kt, vt, kr, vr = k0.clone(), v0.clone(), k0.clone(), v0.clone()
        store_kv_triton(key, value, kt, vt, slots)
        ref.store_kv_reference(key, value, kr, vr, slots)
        same = torch.equal(kt.nan_to_num(7.0), kr.nan_to_num(7.0)) and torch.equal(vt, vr)
        check("store_kv", f"block {bs} Hkv{hkv} D{d} {str(dt)[6:]}", 0.0 if same else 1.0, same)


def check_decode():
    g = torch.Generator().manual_seed(1)
    rnd = lambda n, hi: torch.randint(1, hi + 1, (n,), generator=g).tolist()  # noqa: E731
    cases = [  # (D, group, Hkv, block_size, dtype, contexts)
        (128, 1, 4, 16, FP32, [0, 1, 15, 16, 17, 1000]),
        (128, 2, 8, 16, BF16, [0 if i % 17 == 0 else c for i, c in enumerate(rnd(256, 2048))]),
        (64, 4, 2, 64, BF16, rnd(29, 4096) + [63, 64, 128]),
        (128, 8, 2, 256, FP32, [16384, 255, 257, 0]),
        (64, 8, 1, 16, FP32, rnd(8, 16384)),
        (128, 4, 4, 64, BF16, [16384]),
        (128, 2, 8, 256, BF16, rnd(64, 4096)),
        (64, 1, 8, 256, BF16, [1, 300, 9000]),
        (128, 2, 4, 64, FP32, rnd(128, 1024)),
    ]
    for d, group, hkv, bs, dt, ctx in cases:
        kc, vc, bt, cl = make_cache(ctx, hkv, d, bs, dt)
        q = torch.randn(len(ctx), group * hkv, d, dtype=dt, device=DEV)
        with poisoned_empty():
            out = decode_attention_triton(q, kc, vc, bt, cl, d ** -0.5)
        attention_ok("decode", f"B{len(ctx)} D{d} G{group} Hkv{hkv} block {bs} ctx<={max(ctx)}", dt, out,
                     ref.decode_attention_reference(q, kc, vc, bt, cl, d ** -0.5))
    kc, vc, bt, cl = make_cache([1000, 0, 37, 4000], 8, 128, 16, BF16)
    q = torch.randn(4, 16, 128, dtype=BF16, device=DEV)
    decode_attention_triton(q, kc, vc, bt, cl, 0.1)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention_triton(q, kc, vc, bt, cl, 0.1)
    cl.copy_(torch.tensor([5, 3999, 0, 1], dtype=torch.int32))
    q.copy_(torch.randn_like(q))
    out.fill_(float("nan"))
    graph.replay()
    attention_ok("decode", "CUDA graph replayed with new context_lens", BF16, out,
                 ref.decode_attention_reference(q, kc, vc, bt, cl, 0.1))


def check_prefill():
    cases = [  # (D, group, Hkv, block_size, dtype, query lengths, cached prefix lengths)
        (128, 2, 8, 16, BF16, [1000, 1, 37, 300], [0, 64, 500, 3796]),
        (64, 4, 2, 64, FP32, [5, 128, 64, 200], [0, 0, 17, 1000]),
        (128, 8, 2, 256, BF16, [2048], [3000]),
        (128, 1, 4, 64, FP32, [256, 513], [0, 255]),
        (64, 2, 4, 16, BF16, torch.randint(1, 300, (16,)).tolist(), torch.randint(0, 2000, (16,)).tolist()),
        (128, 4, 2, 256, FP32, [1, 1, 1], [0, 16383, 100]),
    ]
    for d, group, hkv, bs, dt, q_lens, prefix in cases:
        ctx = [a + b for a, b in zip(q_lens, prefix)]
        kc, vc, bt, cl = make_cache(ctx, hkv, d, bs, dt)
        cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEV)
        q = torch.randn(sum(q_lens), group * hkv, d, dtype=dt, device=DEV)
        with poisoned_empty():
            out = prefill_attention_triton(q, kc, vc, cu, cl, bt, d ** -0.5)
        attention_ok("prefill", f"B{len(q_lens)} D{d} G{group} block {bs} q<={max(q_lens)} ctx<={max(ctx)}", dt,
                     out, ref.prefill_attention_reference(q, kc, vc, cu, cl, bt, d ** -0.5))


def check_rope_store():
    heads, kv_heads, head_dim, block = 16, 8, 128, 64
    for tokens in (256, 4096):
        for qk_norm in (True, False):
            g = torch.Generator(device=DEV).manual_seed(tokens)
            qkv = (torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, device=DEV, generator=g) * 3).to(BF16)
            positions = torch.randint(0, 4096, (tokens,), device=DEV, generator=g)
            rotary = RotaryEmbedding(head_dim, 4096, 1e6).to(DEV)
            w = [(torch.rand(head_dim, device=DEV, generator=g) + 0.5).to(BF16) if qk_norm else None
                 for _ in range(2)]
            num_blocks = tokens // block + 2
            slots = torch.randperm(num_blocks * block, device=DEV, generator=g)[:tokens]
            slots[::7] = -1
            caches = [[torch.zeros(num_blocks, kv_heads, block, head_dim, device=DEV, dtype=BF16)
                       for _ in range(2)] for _ in range(2)]
            common = (qkv, positions, rotary.cos_cache, rotary.sin_cache, *w, 1e-6)
            want = ref.rope_store_kv_reference(*common, *caches[0], slots, heads, kv_heads)
            with poisoned_empty():
                got = rope_store_kv_triton(*common, *caches[1], slots, heads, kv_heads)
            pairs = [(got, want), (caches[1][0], caches[0][0]), (caches[1][1], caches[0][1])]
            share = sum((a != b).sum().item() for a, b in pairs) / sum(a.numel() for a, _ in pairs)
            check("rope_store", f"T={tokens} qk_norm={qk_norm} (share of elements differing)", share,
                  share < 1e-4 if qk_norm else share == 0)


def tuned_matmuls() -> list[tuple[str, int, int, bool, int, object]]:
    """(table key, n_out, k, silu, max_m, config) of every Triton entry in this GPU's dispatch table in force."""
    out = []
    for key, entries in matmul_configs._table(torch.device(DEV)).items():
        n_out, k, silu = (int(v) for v in key.split(","))
        out += [(key, n_out, k, bool(silu), m, cfg) for m, cfg in entries if cfg is not None]
    return out


def check_matmul():
    for key, n_out, k, silu, m, cfg in tuned_matmuls():
        w = torch.randn(2 * n_out if silu else n_out, k, device=DEV, dtype=BF16) / k ** 0.5
        x = torch.randn(m, k, device=DEV, dtype=BF16)
        want = ref.linear_reference(x.float(), w.float(), None, silu)
        err = rel_err(linear_triton(x, w, None, cfg, silu), want)
        check("matmul", f"{key} m={m}", err, err < 1e-2)


def sampler_args(batch: int, vocab: int = 151936):
    g = torch.Generator(device=DEV).manual_seed(batch)
    logits = (torch.randn(batch, vocab, device=DEV, generator=g) * 3).to(BF16)
    temperature = torch.where(torch.arange(batch, device=DEV) % 2 == 0, 0.0, 0.6)
    seeds = torch.randint(0, 2**62, (batch,), device=DEV, generator=g)
    return logits, temperature, seeds, torch.randint(0, 4096, (batch,), device=DEV, generator=g)


def check_sampler():
    noise, bound = gumbel_bound_triton(uniform_from_bits(torch.arange(2**23, device=DEV) << 9))
    fails = (bound < noise).sum().item()
    check("sampler", "skip bound >= noise for all 2**23 uniforms (count below)", fails, fails == 0)
    for batch in (2, 8, 64, 256):
        args = sampler_args(batch)
        got = gumbel_argmax_triton(*args)
        differ = (got != gumbel_argmax_reference(*args)).sum().item()
        check("sampler", f"B{batch} rows differing from the reference", differ, differ == 0)
        differ = (got != gumbel_argmax_triton(*args, skip=False)).sum().item()
        check("sampler", f"B{batch} rows differing without the tile skip", differ, differ == 0)


def timed(kernel: str, case: str, nbytes: int, calls, bandwidth: float) -> dict:
    us = graph_us(calls, replays=10)
    row = {"kernel": kernel, "case": case, "us": round(us, 1), "gbps": round(nbytes / us / 1e3, 1),
           "of_copy": round(nbytes / us / 1e3 / (bandwidth / 1e9), 3)}
    print(f"| {kernel} | {case} | {row['us']} | {row['gbps']} | {row['of_copy']:.1%} |", flush=True)
    return row


def timing_rows(bandwidth: float) -> list[dict]:
    print("| kernel | case | us | GB/s | of copy |\n|---|---|---|---|---|")
    rows, hq, hkv, d = [], 16, 8, 128
    for batch, ctx in [(256, 1024), (64, 4096), (8, 16384), (128, "1..4096")]:
        lens = torch.randint(1, 4097, (batch,)).tolist() if ctx == "1..4096" else [ctx] * batch
        kc, vc, bt, cl = make_cache(lens, hkv, d, 64, BF16)
        q = torch.randn(batch, hq, d, dtype=BF16, device=DEV)
        nbytes = sum(lens) * hkv * d * 2 * 2 + 2 * q.numel() * 2
        rows.append(timed("decode attention", f"B{batch} ctx {ctx}", nbytes,
                          [lambda: decode_attention_triton(q, kc, vc, bt, cl, d ** -0.5)] * 5, bandwidth))
        del kc, vc
    for batch in (8, 64, 256):
        sets = [sampler_args(batch) for _ in range(copies(batch * 151936 * 2))]
        rows.append(timed("sampler", f"B{batch} x 151936", batch * 151936 * 2,
                          [lambda a=a: gumbel_argmax_triton(*a) for a in sets], bandwidth))
    for key, n_out, k, silu, m, cfg in tuned_matmuls():
        n = 2 * n_out if silu else n_out
        weights = [torch.randn(n, k, device=DEV, dtype=BF16) for _ in range(copies(n * k * 2))]
        x = torch.randn(m, k, device=DEV, dtype=BF16)
        rows.append(timed("matmul", f"{key} m={m}", 2 * (n * k + m * k + m * n_out),
                          [lambda w=w: linear_triton(x, w, None, cfg, silu) for w in weights], bandwidth))
    return rows


def copies(nbytes: int) -> int:
    return max(1, min(64, math.ceil(L2_SAFE_BYTES / nbytes)))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--no-timing", action="store_true", help="run the exactness checks only")
    args = p.parse_args()
    torch.manual_seed(0)
    for step in (check_store, check_decode, check_prefill, check_rope_store, check_matmul, check_sampler):
        print(f"== {step.__name__}", flush=True)
        step()
    bandwidth = copy_bandwidth(DEV)
    print(f"copy bandwidth (read + write): {bandwidth / 1e9:.0f} GB/s")
    rows = [] if args.no_timing else timing_rows(bandwidth)
    failed = [c for c in CHECKS if not c["ok"]]
    print(f"checks: {len(CHECKS) - len(failed)}/{len(CHECKS)} ok" +
          "".join(f"\n  FAILED {c['check']} {c['case']}: {c['error']:.3g}" for c in failed))
    write_json("kernel_checks.json", {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                      "triton": triton.__version__, "copy_gbps": round(bandwidth / 1e9, 1),
                                      "checks": CHECKS, "timing": rows})
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
