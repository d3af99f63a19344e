"""nano-vllm's throughput benchmark, reproduced exactly, plus a batch-size sweep and an eager padding table.

    python bench.py --bs 256                  # the headline number
    python bench.py --sweep-bs 16,32,64,128,256
    python bench.py --compare-padding --enforce-eager

The workload is nano-vllm's: ``random.seed(0)``; prompts ``[[randint(0, 10000) for _ in range(randint(100, 1024))]
...]``, then ``max_tokens=randint(100, 1024)`` per sequence, in that order (256 sequences: 142,827 input and
133,966 output tokens); temperature 0.6, ignore_eos, max_model_len 4096; one warm-up generate, then one timed.
Without ``--model`` a random-weight Qwen3-0.6B checkpoint is synthesized once and cached (no download).
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from random import randint, seed

import torch

from nanovllm import LLM, SamplingParams


def workload(num_seqs: int, max_input_len: int, max_output_len: int):
    seed(0)
    prompts = [[randint(0, 10000) for _ in range(randint(100, max_input_len))] for _ in range(num_seqs)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=randint(100, max_output_len))
              for _ in range(num_seqs)]
    return prompts, params


def build_llm(args, bs: int, enforce_eager: bool) -> LLM:
    buckets = args.graph_batch_sizes
    if buckets is not None:
        buckets = [b for b in buckets if b <= bs] or None
    t = time.perf_counter()
    extra = {} if args.max_num_batched_tokens is None else {"max_num_batched_tokens": args.max_num_batched_tokens}
    if args.prefill_graph_sizes is not None:
        extra["prefill_graph_sizes"] = args.prefill_graph_sizes
    if args.pipeline_depth is not None:
        extra["pipeline_depth"] = args.pipeline_depth
    llm = LLM(args.model, enforce_eager=enforce_eager, max_num_seqs=bs, graph_batch_sizes=buckets,
              max_model_len=4096, dtype=args.dtype, device=args.device, **extra)
    llm.init_seconds = time.perf_counter() - t
    return llm


def run_once(llm: LLM, args, keep_steps: bool = False) -> dict:
    """One warm-up and one timed generate of the workload; ``keep_steps`` adds every step's times."""
    prompts, params = workload(args.num_seqs, args.max_input_len, args.max_output_len)
    llm.generate([[1, 2, 3, 4]], SamplingParams(), use_tqdm=False)  # warm-up, as nano-vllm does
    engine = llm.engine
    for key in engine.stats:
        engine.stats[key] = 0 if isinstance(engine.stats[key], int) else 0.0
    engine.runner.decode_prepare_time = 0.0
    engine.step_log = []
    engine.block_manager.reset_prefix_cache()  # a repeated run must prefill in full, like the first
    allocator = allocator_counts(engine.runner.device)
    collections = []  # (generation, seconds) of every garbage collection during the timed run
    gc.callbacks.append(gc_timer(collections))
    t = time.perf_counter()
    try:
        llm.generate(prompts, params, use_tqdm=False)
    finally:
        seconds = time.perf_counter() - t
        gc.callbacks.pop()
    allocator = {k: v - allocator[k] for k, v in allocator_counts(engine.runner.device).items()}
    log, engine.step_log = engine.step_log, None
    tokens = sum(p.max_tokens for p in params)
    s = engine.stats
    runner = engine.runner
    floor = None
    if runner.device.type == "cuda":  # ANCHORS.md's floor: weights once per step plus all KV read, at copy speed
        weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters())
        kv_bytes = s["decode_kv_tokens"] * runner.kv_bytes_per_block() // runner.block_size
        floor = (s["decode_steps"] * weight_bytes + kv_bytes) / copy_bandwidth(runner.device)
    steps = max(s["decode_steps"], 1)
    engine_steps = max(s["decode_steps"] + s["prefill_steps"], 1)
    return {
        "tokens": tokens, "input_tokens": sum(map(len, prompts)), "seconds": round(seconds, 3),
        "tok_per_s": round(tokens / seconds, 2),
        "prefill_seconds": round(s["prefill_time"], 3), "decode_seconds": round(s["decode_time"], 3),
        # generate's time outside engine steps: prompt checks and adding requests before the first step, and the
        # loop's own work between steps (progress, detokenizing finished sequences) while the device runs one
        "other_seconds": round(seconds - s["prefill_time"] - s["decode_time"], 3),
        "decode_steps": s["decode_steps"], "decode_step_ms": round(1000 * s["decode_time"] / steps, 3),
        "host_prepare_ms_per_step": round(1000 * engine.runner.decode_prepare_time / steps, 3),
        # host work per engine step (schedule, prepare, launch, bookkeeping) and time blocked on the device:
        # the host overlaps the device, so it costs throughput only where it exceeds the device's step time
        "host_ms_per_step": round(1000 * s["host_time"] / engine_steps, 3),
        "device_wait_ms_per_step": round(1000 * s["wait_time"] / engine_steps, 3),
        "preemptions": engine.scheduler.num_preemptions,
        "decode_floor_seconds": None if floor is None else round(floor, 3),
        "decode_vs_floor": None if floor is None else round(floor / max(s["decode_time"], 1e-9), 3),
        "decode_by_batch": decode_by_batch(log),
        # wall ms charged to each prefill step, and what the caching allocator did during the run (device
        # mallocs/frees and out-of-memory retries, each of which synchronises and frees the cache)
        "prefill_step_ms": [round(1000 * r.seconds, 1) for r in log if r.kind == "prefill"],
        "allocator": allocator,
        "gc": {"collections": len(collections), "ms": round(1000 * sum(d for _, _, d in collections), 1),
               "full": sum(1 for _, g, _ in collections if g == 2)},
        **({"step_log": step_log_json(log, collections, t)} if keep_steps else {}),
    }


def step_log_json(log: list, collections: list, origin: float) -> dict:
    """Every engine step and garbage collection of a run, in ms from ``origin`` (for host_stalls.py)."""
    ms = lambda x: round(1000 * x, 3)  # noqa: E731
    return {"fields": ["kind", "seqs", "start_ms", "ms", "wait_ms", "launch_ms"],
            "steps": [[r.kind, r.seqs, ms(r.start - origin), ms(r.seconds), ms(r.wait), ms(r.launch)] for r in log],
            "gc": [[ms(start - origin), generation, ms(d)] for start, generation, d in collections]}


def gc_timer(out: list):
    """A ``gc.callbacks`` hook appending (start, generation, seconds) of each collection to ``out``."""
    start = [0.0]

    def hook(phase, info):
        if phase == "start":
            start[0] = time.perf_counter()
        else:
            out.append((start[0], info["generation"], time.perf_counter() - start[0]))
    return hook


def allocator_counts(device) -> dict:
    """Cumulative device allocations, frees and allocation retries of torch's caching allocator (CUDA only)."""
    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    return {k: stats.get(k, 0) for k in ("num_device_alloc", "num_device_free", "num_alloc_retries")}


def decode_by_batch(log: list) -> dict:
    """Decode steps and wall seconds by running-batch size range (where the decode time goes)."""
    edges = [1, 16, 64, 128, 192, 256, 1 << 30]
    out = {}
    for lo, hi in zip(edges, edges[1:]):
        times = [r.seconds for r in log if r.kind == "decode" and lo <= r.seqs < hi]
        if times:
            out[f"{lo}-{hi - 1}" if hi < 1 << 30 else f">={lo}"] = {"steps": len(times), "seconds": round(sum(times), 3)}
    return out


def profile_decode(llm: LLM, args, skip: int, steps: int) -> list[dict]:
    """GPU time per kernel over ``steps`` engine steps of the workload, after ``skip`` steps (CUDA only)."""
    from torch.profiler import ProfilerActivity, profile, schedule
    prompts, params = workload(args.num_seqs, args.max_input_len, args.max_output_len)
    engine = llm.engine
    plain_step = engine.step
    with profile(activities=[ProfilerActivity.CUDA], schedule=schedule(wait=skip, warmup=2, active=steps)) as prof:
        def step():
            out = plain_step()
            prof.step()
            return out
        engine.step = step
        try:
            llm.generate(prompts, params, use_tqdm=False)
        finally:
            engine.step = plain_step
    rows = sorted(prof.key_averages(), key=lambda e: -e.device_time_total)
    total = sum(e.device_time_total for e in rows) or 1
    return [{"kernel": e.key[:90], "ms_per_step": round(e.device_time_total / 1000 / steps, 3),
             "share": round(e.device_time_total / total, 3), "calls_per_step": e.count // steps} for e in rows[:25]]


def copy_bandwidth(device) -> float:
    """Bytes read + written per second by a large device-to-device copy (the practical memory ceiling)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize(device)
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize(device)
    return 2 * a.numel() * 10 / (time.perf_counter() - t)


def run_in_subprocess(args, bs: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--model", args.model, "--bs", str(bs), "--json", out,
               "--num-seqs", str(args.num_seqs), "--max-input-len", str(args.max_input_len),
               "--max-output-len", str(args.max_output_len), "--dtype", args.dtype, "--device", args.device]
        if args.enforce_eager:
            cmd.append("--enforce-eager")
        if args.graph_batch_sizes:
            cmd += ["--graph-batch-sizes", ",".join(map(str, args.graph_batch_sizes))]
        if args.max_num_batched_tokens is not None:
            cmd += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
        if args.prefill_graph_sizes is not None:
            cmd += ["--prefill-graph-sizes", ",".join(map(str, args.prefill_graph_sizes)) or "none"]
        if args.pipeline_depth is not None:
            cmd += ["--pipeline-depth", str(args.pipeline_depth)]
        subprocess.run(cmd, check=True)
        with open(out) as f:
            return json.load(f)


def describe(llm: LLM) -> dict:
    r = llm.engine.runner
    return {"device": torch.cuda.get_device_name(r.device) if r.device.type == "cuda" else "cpu",
            "dtype": str(r.dtype).replace("torch.", ""), "mode": r.mode, "torch": torch.__version__,
            "max_num_seqs": llm.config.max_num_seqs, "graph_batch_sizes": list(llm.config.graph_batch_sizes),
            "max_num_batched_tokens": llm.config.max_num_batched_tokens, "pipeline_depth": llm.config.pipeline_depth,
            "prefill_graph_sizes": list(getattr(getattr(r.executor, "prefill_graphs", None), "sizes", ())),
            "kv_blocks": r.num_blocks, "kvcache_block_size": r.block_size,
            "decode_attention": decode_attention_variant(r.device),
            "matmul": os.environ.get("NANOVLLM_MATMUL", "auto") if r.device.type == "cuda" else "torch",
            "init_seconds": round(llm.init_seconds, 2), **compile_cache_state(r.executor)}


def decode_attention_variant(device) -> str:
    if device.type != "cuda":
        return "reference"
    from nanovllm.kernels.triton_decode import decode_variant
    return decode_variant()


def compile_cache_state(executor) -> dict:
    """Whether start-up found its compiled step in the compile cache (graph mode only)."""
    cache = getattr(executor, "cache", None)
    if cache is None:
        return {}
    return {"compile_cache": "hit" if cache.hit else "miss", "step": getattr(executor, "step_origin", None)}


def plot_sweep(results: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    bs = [r["max_num_seqs"] for r in results]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.plot(bs, [r["tok_per_s"] for r in results], "o-")
    a.set(xlabel="max batch size (largest bucket)", ylabel="output tok/s", title="bench.py throughput")
    b.plot(bs, [r["decode_step_ms"] for r in results], "o-", label="decode step (measured)")
    if all(r.get("decode_floor_seconds") for r in results):
        b.plot(bs, [1000 * r["decode_floor_seconds"] / max(r["decode_steps"], 1) for r in results], "s--",
               label="byte floor (weights + KV at copy bandwidth)")
    b.set(xlabel="max batch size (largest bucket)", ylabel="ms per decode step", title="decode step vs floor")
    b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def make_parser(description: str = __doc__) -> argparse.ArgumentParser:
    """bench's options (benchmarks/host_stalls.py adds its own)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF checkpoint dir (default: synthesized random-weight Qwen3-0.6B)")
    p.add_argument("--bs", type=int, default=256, help="max_num_seqs and the largest graph bucket")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--max-input-len", type=int, default=1024)
    p.add_argument("--max-output-len", type=int, default=1024)
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--graph-batch-sizes", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--max-num-batched-tokens", type=int, help="tokens per prefill step (default: the LLM default)")
    p.add_argument("--prefill-graph-sizes", type=lambda s: [] if s == "none" else [int(x) for x in s.split(",")],
                   help="token counts prefill steps are captured at, or 'none' (default: the LLM default)")
    p.add_argument("--pipeline-depth", type=int,
                   help="engine steps queued before the host reads the oldest's tokens (default: the LLM default)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", help="also write the result(s) to this file")
    p.add_argument("--repeat", type=int, default=1,
                   help="time the workload this many times in one process, each with an empty prefix cache")
    p.add_argument("--sweep-bs", type=lambda s: [int(x) for x in s.split(",")],
                   help="run the bench once per max batch size (graph mode) and print a table")
    p.add_argument("--plot", help="with --sweep-bs: save a PNG of throughput and decode step time vs its floor")
    p.add_argument("--profile-steps", type=int, default=0,
                   help="after the timed run, profile this many decode steps (from step 300) and print GPU time per kernel")
    p.add_argument("--compare-padding", action="store_true",
                   help="eager mode with decode batches padded to buckets vs not padded")
    return p


def main():
    p = make_parser()
    args = p.parse_args()
    if args.repeat < 1:
        p.error(f"--repeat must be >= 1, got {args.repeat}")
    if args.model is None:
        from nanovllm.tools.synthesize import cached_synthetic
        args.model = str(cached_synthetic("qwen3-0.6b", dtype="bfloat16"))
    results = []
    if args.sweep_bs:
        for bs in args.sweep_bs:  # one process per size, so each run gets the whole GPU to itself
            results.append(run_in_subprocess(args, bs))
        print("| max bs | tok/s | time (s) | decode step (ms) |\n|---|---|---|---|")
        for r in results:
            print(f"| {r['max_num_seqs']} | {r['tok_per_s']:.0f} | {r['seconds']:.2f} | {r['decode_step_ms']:.2f} |")
        if args.plot:
            plot_sweep(results, args.plot)
    elif args.compare_padding:
        from nanovllm.compile.executor import EagerExecutor
        llm = build_llm(args, args.bs, enforce_eager=True)
        for padded in (False, True):
            runner = llm.engine.runner
            runner.executor = EagerExecutor(runner, llm.config.graph_batch_sizes if padded else None)
            results.append({**describe(llm), "padding": padded, **run_once(llm, args)})
        print("| eager decode | tok/s | time (s) |\n|---|---|---|")
        for r in results:
            print(f"| {'padded to buckets' if r['padding'] else 'not padded'} | {r['tok_per_s']:.0f} | {r['seconds']:.2f} |")
    else:
        llm = build_llm(args, args.bs, args.enforce_eager)
        for _ in range(args.repeat):
            r = {**describe(llm), **run_once(llm, args)}
            results.append(r)
            print(f"Total: {r['tokens']}tok, Time: {r['seconds']:.2f}s, Throughput: {r['tok_per_s']:.2f}tok/s")
        if args.profile_steps and llm.engine.runner.device.type == "cuda":
            r["kernel_profile"] = profile_decode(llm, args, 300, args.profile_steps)
            print("| kernel | ms/step | share | calls/step |\n|---|---|---|---|")
            for k in r["kernel_profile"]:
                print(f"| {k['kernel']} | {k['ms_per_step']} | {k['share']:.1%} | {k['calls_per_step']} |")
    for r in results:
        print(json.dumps(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results if len(results) > 1 else results[0], f, indent=2)


if __name__ == "__main__":
    main()
