"""Expert offload on a GPU: Mixtral-8x7B's real config with dummy weights, the device budget capped so that the
experts do not fit, decode throughput against the host-to-device copy floor; ours, or vLLM's ``cpu_offload_gb``.

    python -m benchmarks.offload_bench [--model DIR] [--budget-gb 16] [--host-share S] [--batch-sizes 1,16]
    env PYTHONPATH=/tmp/site python -m benchmarks.offload_bench --engine vllm --model DIR [--cpu-offload-gb 80]

Without ``--model`` it writes the ``mixtral-8x7b`` preset's config.  Per batch size: a prefill-only pass, then the
same random prompts with ``--max-tokens``.  Ours (``offload_bench.json``, a table in ``offload_bench.md``): the
second pass's decode statistics and expert traffic (counter differences): decode tok/s, hit rate, bytes fetched
per step, experts split between device and host, and two floors: the copies' (bytes fetched over the copy
bandwidth) and the two-link one (missed bytes over copy plus host-compute bandwidth).  Random weights route
near-uniformly, so the hit rate is a lower bound.  ``--profile`` writes the first batch size's operators by host
time to ``offload_profile.txt``.  vLLM (``offload_vllm.json``): decode tok/s from the two passes' extra tokens over
their extra time, and whether it really offloaded (the weights' device bytes below the checkpoint's).
"""
import argparse
import json
import os
import random
import time

import torch

from benchmarks.common import out_dir, positive_ints, write_json


def expert_copy_bandwidth(cache, reps: int = 5) -> float:
    """Bytes per second of the copy a miss makes: a resident expert's host matrices into its own device slot (the
    same bytes, so nothing changes), on the cache's copy stream where it has one."""
    expert, slot = next(iter(cache.lru.items()))
    pairs = [(dst[slot], src[expert]) for dst, src in cache.stacks]  # weights, and scales and zeros if quantized

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
    hidden = cache.host_w2t.shape[2]  # w13's last dim is H / 2 bytes for int4 experts
    dtype = cache.host_w13.dtype if cache.host_w13.dtype.is_floating_point and cache.host_w13.element_size() > 1 \
        else torch.bfloat16  # quantized experts meet 16-bit activations
    x = torch.randn(1, hidden, dtype=dtype)
    weights, ids = torch.ones(1, 1), torch.zeros(1, 1, dtype=torch.int64)
    best = float("inf")
    for _ in range(reps + 1):
        t = time.perf_counter()
        cache.compute_on_host(x, weights, ids, [0], None)
        best = min(best, time.perf_counter() - t)
    return cache.expert_bytes / best


def run_case(llm, prompts, max_tokens: int) -> dict:
    from nanovllm import SamplingParams
    from nanovllm.models.expert_offload import COUNTERS, offload_stats
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


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engine", choices=("nanovllm", "vllm"), default="nanovllm")
    p.add_argument("--model", help="checkpoint dir (default: the mixtral-8x7b preset's config, dummy weights)")
    p.add_argument("--load-format", default="dummy")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--budget-gb", type=float, default=16.0, help="device memory the engine may use (CUDA)")
    p.add_argument("--experts-on-device", type=int, default=1)
    p.add_argument("--host-share", type=float, default=None,
                   help="offload_host_share: the share of misses the host computes (default: the engine's)")
    p.add_argument("--host-threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
    p.add_argument("--cpu-offload-gb", type=float, default=80.0, help="vLLM's cpu_offload_gb (--engine vllm)")
    p.add_argument("--batch-sizes", default="1,16")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--profile", action="store_true", help="also profile one run (offload_profile.txt)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.out:
        os.environ["OUT"] = a.out
    if a.model is None:
        from nanovllm.tools.synthesize import synthesize
        a.model = os.path.join(out_dir(), "mixtral-8x7b-config")
        if not os.path.isfile(os.path.join(a.model, "config.json")):
            synthesize("mixtral-8x7b", a.model, dtype="bfloat16", config_only=True)
    a.sizes = positive_ints(a.batch_sizes, "--batch-sizes")
    return a


def main(argv=None) -> dict:
    a = parse(argv)
    if a.engine == "vllm":
        return run_vllm(a)
    from nanovllm import LLM
    if a.host_threads:
        torch.set_num_threads(a.host_threads)
    engine = dict(device=a.device, dtype=a.dtype, load_format=a.load_format, offload_experts=True,
                  experts_on_device=a.experts_on_device, max_num_seqs=max(a.sizes), max_model_len=512,
                  max_num_batched_tokens=2048)  # a small prefill keeps the activation peak inside the budget
    if a.host_share is not None:
        engine["offload_host_share"] = a.host_share
    if torch.device(a.device).type == "cuda":
        total = torch.cuda.get_device_properties(a.device).total_memory
        engine["gpu_memory_utilization"] = min(1.0, a.budget_gb * 2**30 / total)
    else:
        engine["num_kvcache_blocks"] = 64
    t = time.perf_counter()
    llm = LLM(a.model, **engine)
    init_s = time.perf_counter() - t
    cache = llm.engine.runner.expert_caches[0]
    bandwidth, host_rate = expert_copy_bandwidth(cache), host_expert_bandwidth(cache)
    desc = llm.engine.describe()
    rng = random.Random(0)
    vocab = llm.engine.runner.vocab_size
    rows = []
    for bs in a.sizes:
        prompts = [[rng.randrange(3, vocab) for _ in range(a.prompt_len)] for _ in range(bs)]
        r = run_case(llm, prompts, a.max_tokens)
        floor_s = r["bytes_fetched_per_step"] / bandwidth
        both_s = r["missed_bytes_per_step"] / (bandwidth + host_rate)
        r.update(batch=bs, floor_step_ms=round(1000 * floor_s, 6), two_link_floor_ms=round(1000 * both_s, 6),
                 pct_of_floor=round(100 * floor_s / max(r["decode_step_ms"] / 1000, 1e-12), 1))
        rows.append(r)
    result = {"model": a.model, "engine": engine, "cpu_count": os.cpu_count(), "host_threads": torch.get_num_threads(),
              "init_seconds": round(init_s, 1), "h2d_bytes_per_s": bandwidth, "host_expert_bytes_per_s": host_rate,
              "weight_bytes_on_device": desc["weight_bytes"], "expert_offload": desc["expert_offload"],
              "num_kv_blocks": desc["num_kv_blocks"], "mode": desc["mode"], "rows": rows}
    write_json("offload_bench.json", result)
    cache_gib = desc["expert_offload"]["expert_cache_bytes"] / 2**30
    lines = [f"H2D {bandwidth / 1e9:.1f} GB/s; the host computes an expert at {host_rate / 1e9:.1f} GB/s on "
             f"{torch.get_num_threads()} threads; expert cache {cache_gib:.2f} GiB; non-expert weights "
             f"{desc['weight_bytes'] / 2**30:.2f} GiB", "",
             "| batch | decode tok/s | step ms | hit rate | MB fetched/step | split experts/step | host experts/step "
             "| host ms/step | join wait ms/step | copy floor ms | % of floor | two-link floor ms |", "|---" * 12 + "|"]
    lines += [f"| {r['batch']} | {r['decode_tok_s']} | {r['decode_step_ms']} | {r['hit_rate']:.3f} | "
              f"{r['bytes_fetched_per_step'] / 1e6:.1f} | {r['splits_per_step']} | {r['host_computed_per_step']} | "
              f"{r['host_ms_per_step']} | {r['join_ms_per_step']} | {r['floor_step_ms']:.1f} | {r['pct_of_floor']} | "
              f"{r['two_link_floor_ms']:.1f} |" for r in rows]
    with open(os.path.join(out_dir(), "offload_bench.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    if a.profile:
        profile(llm, [[rng.randrange(3, vocab) for _ in range(a.prompt_len)] for _ in range(a.sizes[0])], a.max_tokens)
    return result


def param_bytes(config: dict) -> int:
    """Bytes of a Mixtral-style checkpoint's parameters in 16-bit: embeddings, attention, experts, norms, head."""
    h, layers, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    dim = config.get("head_dim") or h // heads
    experts, vocab = config.get("num_local_experts", 1), config["vocab_size"]
    per_layer = h * heads * dim * 2 + h * kv * dim * 2 + experts * 3 * h * inter + experts * h + 2 * h
    return 2 * (layers * per_layer + 2 * vocab * h + h)


def run_vllm(a) -> dict:
    """vLLM with ``cpu_offload_gb`` under the same budget; the V2 model runner never installs vLLM's offloader
    (vllm-project/vllm#51396), so the V1 runner is asked for."""
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    import vllm
    from vllm import LLM, SamplingParams
    total = torch.cuda.get_device_properties(0).total_memory
    t = time.perf_counter()
    llm = LLM(a.model, load_format="dummy", skip_tokenizer_init=True, enforce_eager=True, seed=0, max_model_len=512,
              max_num_seqs=max(a.sizes), cpu_offload_gb=a.cpu_offload_gb,
              gpu_memory_utilization=min(1.0, a.budget_gb * 2**30 / total))
    init_s = time.perf_counter() - t
    with open(os.path.join(a.model, "config.json")) as f:
        config = json.load(f)
    allocated, rng, rows = torch.cuda.memory_allocated(), random.Random(0), []
    for bs in a.sizes:
        prompts = [{"prompt_token_ids": [rng.randrange(3, config["vocab_size"]) for _ in range(a.prompt_len)]}
                   for _ in range(bs)]
        timing = {}
        for n in (1, a.max_tokens):
            t = time.perf_counter()
            outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), use_tqdm=False)
            timing[n] = (time.perf_counter() - t, sum(len(o.outputs[0].token_ids) for o in outs))
        extra_s, extra_tokens = (timing[a.max_tokens][i] - timing[1][i] for i in (0, 1))
        rows.append(dict(batch=bs, decode_tok_s=round(extra_tokens / extra_s, 3), prefill_s=round(timing[1][0], 3),
                         decode_step_ms=round(1000 * extra_s / (a.max_tokens - 1), 2)))
    result = dict(engine=f"vllm-{vllm.__version__}", model=a.model, cpu_offload_gb=a.cpu_offload_gb,
                  budget_gb=a.budget_gb, init_s=round(init_s, 1), model_param_bytes=param_bytes(config),
                  cuda_allocated_bytes=allocated, offloaded=allocated < param_bytes(config), rows=rows)
    print(json.dumps(result), flush=True)
    write_json("offload_vllm.json", result)
    return result


def profile(llm, prompts, max_tokens: int) -> None:
    """One generate of ``prompts`` under torch.profiler: operators by host time, to ``offload_profile.txt``."""
    from nanovllm import SamplingParams
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
