"""The fused Triton kernels' speed on a GPU against the copy ceiling (their exactness is tests/gpu/test_kernels.py).

    python -m benchmarks.kernel_bench        # prints a table, writes $OUT/kernel_bench.json

Each case is timed as CUDA-graph replays, each call on its own buffers where one would fit in L2: the bytes a
kernel must move over its time, as a share of the device-to-device copy bandwidth.  Decode attention at bench's
shapes (Qwen3-0.6B heads, bf16, KV block 64; over a bf16 and an FP8 cache, half the KV bytes), the sampler over Qwen3's vocabulary, and each tuned matmul of this
GPU's dispatch table at the largest batch its Triton config serves.
"""
import math

import torch

from benchmarks.common import copy_bandwidth, graph_us, write_json

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


def main():
    import triton
    torch.manual_seed(0)
    bandwidth = copy_bandwidth(DEV)
    print(f"copy bandwidth (read + write): {bandwidth / 1e9:.0f} GB/s")
    print("| kernel | case | us | GB/s | of copy |\n|---|---|---|---|---|")
    rows = timing_rows(bandwidth)
    write_json("kernel_bench.json", {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                     "triton": triton.__version__, "copy_gbps": round(bandwidth / 1e9, 1),
                                     "timing": rows})


if __name__ == "__main__":
    main()
