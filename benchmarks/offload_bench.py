"""Expert offload on a GPU: Mixtral-8x7B's real config with dummy weights, the device budget capped so that the
experts do not fit, decode throughput against the host-to-device copy floor.

    python benchmarks/offload_bench.py [--model DIR] [--budget-gb 16] [--experts-on-device 1]
        [--batch-sizes 1,16] [--prefetch on,off] [--host-shares 0,0.5] [--host-threads N,M] [--max-tokens 32]
        [--prompt-len 32] [--profile] [--out DIR]

Without ``--model`` it writes the ``mixtral-8x7b`` preset's config (``tools/synthesize.py --config-only``) and
runs it with ``load_format="dummy"``.  ``gpu_memory_utilization`` is ``--budget-gb`` over the device's memory.
One engine is built (experts on the host take ~93 GB of pinned memory); prefetch and the share of misses the host
computes (``offload_host_share``) are switched on it.

Per batch size, prefetch setting, host thread count (``torch.set_num_threads``) and host share: a prefill-only pass
(``max_tokens=1``), then the same prompts with ``--max-tokens``; the decode figures are the second pass's decode
steps (the engine's own statistics), and the expert traffic of decode is the counter difference of the two passes.
Measured: decode tok/s, hit rate (hits over hits + misses of needed experts), bytes fetched per decode step, the
bandwidth of the copy a miss makes (one expert's pinned matrices into a device slot), experts split between device
and host per step, the host's share of the experts in experts per step with the host's time on them and its wait for
the device after them, and two floors.  The copy floor: bytes fetched per step over the copy bandwidth;
``pct_of_floor`` = that floor / measured step time, the share of a step the copies would take if nothing else ran.
The two-link floor: every missed expert's bytes per step over the copy bandwidth plus the rate at which the host
computes one expert for one token (``host_expert_bandwidth``, at the row's thread count), the step time if copies
and host compute were perfectly balanced and nothing else ran.  Random weights route near-uniformly: real routing
is skewed, so this hit rate is a lower bound. Writes ``offload_bench.json`` and ``offload_bench.md`` (a table) to
``--out`` (default ``$OUT`` or ./results).  ``--profile`` then runs the first batch size once more, at the last host share and thread count, under
``torch.profiler`` and writes its operators by host time to ``offload_profile.txt`` (where a step's host time goes
beside the copies and the host's experts).
"""
import argparse
import itertools
import os
import random
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import out_dir, write_json  # noqa: E402
from nanovllm import LLM, SamplingParams  # noqa: E402
from nanovllm.models.expert_offload import COUNTERS, offload_stats, set_host_share, set_prefetch  # noqa: E402


def expert_copy_bandwidth(cache, reps: int = 5) -> float:
    """Bytes per second of the copy a miss makes: a resident expert's host matrices into its own device slot (the
    same bytes, so nothing changes), on the cache's copy stream where it has one."""
    expert, slot = next(iter(cache.lru.items()))
    pairs = [(cache.w13[slot], cache.host_w13[expert]), (cache.w2t[slot], cache.host_w2t[expert])]

    def copy():
        for dst, src in pairs:
            dst.copy_(src, non_blocking=cache.stream is not None)

    if cache.stream is None:
        t = time.perf_counter()
        for _ in range(reps):
            copy()
        return reps * cache.expert_bytes / (time.perf_counter() - t)
    torch.cuda.synchronize(cache.device)
    with torch.cuda.stream(cache.stream):
        copy()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            copy()
        end.record()
    end.synchronize()
    return reps * cache.expert_bytes / (start.elapsed_time(end) / 1000)


def host_expert_bandwidth(cache, reps: int = 5) -> float:
    """Bytes per second of the host computing one whole expert for one token from its own copy, the way a step does
    (``ExpertCache.compute_on_host``), best of ``reps``; the counters it moves fall outside the rows' deltas."""
    hidden = cache.host_w13.shape[2]
    x = torch.randn(1, hidden, dtype=cache.host_w13.dtype)
    weights, ids = torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int64)
    best = float("inf")
    for _ in range(reps + 1):
        t = time.perf_counter()
        cache.compute_on_host(x, weights, ids, [0], None)
        best = min(best, time.perf_counter() - t)
    return cache.expert_bytes / best


def run_case(llm, prompts, max_tokens: int) -> dict:
    model, engine = llm.engine.runner.model, llm.engine
    params1 = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    before = offload_stats(model)
    llm.generate(prompts, params1, use_tqdm=False)
    after_prefill = offload_stats(model)
    engine.reset_stats()
    llm.generate(prompts, params, use_tqdm=False)
    after = offload_stats(model)
    s = dict(engine.stats)
    prefill_delta = {k: after_prefill[k] - before[k] for k in COUNTERS}
    total = {k: after[k] - after_prefill[k] for k in prefill_delta}
    decode = {k: total[k] - prefill_delta[k] for k in total}  # the second pass's prefill is like the first's
    steps = max(s["decode_steps"], 1)
    step_s = s["decode_time"] / steps
    return {"decode_tokens": s["decode_tokens"], "decode_steps": s["decode_steps"],
            "decode_tok_s": round(s["decode_tokens"] / max(s["decode_time"], 1e-9), 2),
            "decode_step_ms": round(1000 * step_s, 3),
            "hit_rate": round(decode["hits"] / max(decode["hits"] + decode["misses"], 1), 4),
            "bytes_fetched_per_step": decode["bytes_fetched"] / steps,
            "missed_bytes_per_step": decode["misses"] * llm.engine.runner.expert_caches[0].expert_bytes / steps,
            "splits_per_step": round(decode["splits"] / steps, 2),
            "host_computed_per_step": round(decode["host_computed"] / steps, 2),
            "host_ms_per_step": round(1000 * decode["host_seconds"] / steps, 1),
            "join_ms_per_step": round(1000 * decode["join_seconds"] / steps, 1), "decode_counters": decode}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="checkpoint dir (default: the mixtral-8x7b preset's config, dummy weights)")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--budget-gb", type=float, default=16.0, help="device memory the engine may use (CUDA)")
    p.add_argument("--experts-on-device", type=int, default=1)
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--prefetch", default="on,off", help="prefetch settings to run, of on and off")
    p.add_argument("--host-shares", default="0", help="offload_host_share values to run (0: copy every miss)")
    p.add_argument("--host-threads", default="", help="torch.set_num_threads values to run (default: torch's own)")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--profile", action="store_true", help="also profile one run (offload_profile.txt)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.out:
        os.environ["OUT"] = a.out
    model = a.model
    if model is None:
        from nanovllm.tools.synthesize import synthesize
        model = os.path.join(out_dir(), "mixtral-8x7b-config")
        if not os.path.isfile(os.path.join(model, "config.json")):
            synthesize("mixtral-8x7b", model, dtype="bfloat16", config_only=True)
    device = torch.device(a.device)
    sizes = [int(b) for b in a.batch_sizes.split(",")]
    engine = dict(device=a.device, dtype=a.dtype, load_format=a.load_format, offload_experts=True,
                  experts_on_device=a.experts_on_device, max_num_seqs=max(sizes), max_model_len=512,
                  max_num_batched_tokens=2048)  # a small prefill keeps the activation peak inside the budget
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        engine["gpu_memory_utilization"] = min(1.0, a.budget_gb * 2**30 / total)
    else:
        engine["num_kvcache_blocks"] = 64
    t = time.perf_counter()
    llm = LLM(model, **engine)
    init_s = time.perf_counter() - t
    bandwidth = expert_copy_bandwidth(llm.engine.runner.expert_caches[0])
    host_rate = host_expert_bandwidth(llm.engine.runner.expert_caches[0])
    desc = llm.engine.describe()
    rng = random.Random(0)
    vocab = llm.engine.runner.vocab_size
    thread_counts = [int(x) for x in a.host_threads.split(",")] if a.host_threads else [torch.get_num_threads()]
    rows = []
    for bs in sizes:
        prompts = [[rng.randrange(3, vocab) for _ in range(a.prompt_len)] for _ in range(bs)]
        for prefetch in [x == "on" for x in a.prefetch.split(",")]:
            for threads, share in itertools.product(thread_counts, [float(x) for x in a.host_shares.split(",")]):
                torch.set_num_threads(threads)
                set_prefetch(llm.engine.runner.model, prefetch)
                set_host_share(llm.engine.runner.model, share)
                r = run_case(llm, prompts, a.max_tokens)
                floor_s = r["bytes_fetched_per_step"] / bandwidth
                rate = host_expert_bandwidth(llm.engine.runner.expert_caches[0])  # at this row's threads
                both_s = r["missed_bytes_per_step"] / (bandwidth + rate)
                r.update(batch=bs, prefetch=prefetch, host_share=share, host_threads=threads,
                         host_expert_bytes_per_s=rate,
                         floor_step_ms=round(1000 * floor_s, 6), two_link_floor_ms=round(1000 * both_s, 6),
                         pct_of_floor=round(100 * floor_s / max(r["decode_step_ms"] / 1000, 1e-12), 1))
                rows.append(r)
    result = {"model": model, "engine": engine, "cpu_count": os.cpu_count(), "init_seconds": round(init_s, 1),
              "h2d_bytes_per_s": bandwidth, "host_expert_bytes_per_s": host_rate,
              "weight_bytes_on_device": desc["weight_bytes"], "expert_offload": desc["expert_offload"],
              "num_kv_blocks": desc["num_kv_blocks"], "mode": desc["mode"], "rows": rows}
    write_json("offload_bench.json", result)
    cache_gib = desc['expert_offload']['expert_cache_bytes'] / 2**30
    lines = [f"H2D {bandwidth / 1e9:.1f} GB/s; the host computes an expert at {host_rate / 1e9:.1f} GB/s; expert "
             f"cache {cache_gib:.2f} GiB; non-expert weights {desc['weight_bytes'] / 2**30:.2f} GiB; "
             f"{os.cpu_count()} host CPUs",
             "", "| batch | prefetch | host threads | host share | decode tok/s | step ms | hit rate | MB fetched/step "
             "| split experts/step | host experts/step | host ms/step | join wait ms/step | copy floor ms | % of floor "
             "| two-link floor ms |",
             "|---" * 15 + "|"]
    lines += [f"| {r['batch']} | {'on' if r['prefetch'] else 'off'} | {r['host_threads']} | {r['host_share']:g} | "
              f"{r['decode_tok_s']} | {r['decode_step_ms']} | {r['hit_rate']:.3f} | "
              f"{r['bytes_fetched_per_step'] / 1e6:.1f} | {r['splits_per_step']} | {r['host_computed_per_step']} | "
              f"{r['host_ms_per_step']} | {r['join_ms_per_step']} | {r['floor_step_ms']:.1f} | {r['pct_of_floor']} | "
              f"{r['two_link_floor_ms']:.1f} |" for r in rows]
    with open(os.path.join(out_dir(), "offload_bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if a.profile:
        profile(llm, [[rng.randrange(3, vocab) for _ in range(a.prompt_len)] for _ in range(sizes[0])], a.max_tokens)
    return result


def profile(llm, prompts, max_tokens: int) -> None:
    """One generate of ``prompts`` under torch.profiler: operators by host time, to ``offload_profile.txt``."""
    from torch.profiler import ProfilerActivity
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    with torch.profiler.profile(activities=activities) as prof:
        llm.generate(prompts, params, use_tqdm=False)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    with open(os.path.join(out_dir(), "offload_profile.txt"), "w") as f:
        f.write(f"{len(prompts)} prompts, {max_tokens} tokens\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
