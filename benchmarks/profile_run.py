"""Where the GPU time of bench.py's workload goes, per window of engine steps (CUDA only).

    python -m benchmarks.profile_run [--at 256,192,128,64,32,8] [--steps 10] [--prefill] [bench's engine flags]
    python -m benchmarks.profile_run --engine vllm --model DIR [--at 256] [--steps 10]   # vLLM staged on PYTHONPATH
    python -m benchmarks.profile_run --count-experts --model DIR   # MoE routing: distinct experts per layer and step

bench's workload (``--num-seqs`` requests) runs through the step loop twice: the first pass records each step's
launches, the second (prefix cache emptied) profiles ``--steps`` steps from the first decode step whose batch is at
most each size in ``--at`` (and the first prefill steps with ``--prefill``).  Per window: wall and GPU-busy ms a step,
the decode byte floor (weights + KV at the measured copy bandwidth), GPU time by kernel category, idle time by the
categories around each gap, the top kernels (``$OUT/profile_run.json``; overlapping kernels, as under PDL, each count
in full).  ``--count-experts`` runs once in eager mode and counts per MoE call the distinct experts routing picks and
the busiest one's rows, for decode steps of >= 192 sequences and prefill steps (``$OUT/expert_counts.json``).
``--engine vllm``: vLLM, 256 requests: its first 2 steps, then ``--steps`` at each ``--at`` (``profile_run_vllm.json``).
"""
import argparse
import json
import time
from typing import NamedTuple

from benchmarks.common import copy_bandwidth, default_model, llm_kwargs, positive_ints, workload, write_json

CATEGORIES = (("collective", ("nccl", "all_reduce", "one_shot", "two_shot")),  # tensor parallelism
              ("attention", ("_decode", "_prefill")),  # our Triton kernels (nanovllm/kernels)
              ("store_kv", ("_store_kv",)), ("linear attention", ("_delta_rule", "_conv_", "_gdn")),
              ("sampler", ("_gumbel_argmax",)),
              ("matmul", ("_linear_kernel", "nvjet", "gemm", "cutlass", "sm90_", "cublas", "splitK")))
OTHER = "other (fused elementwise / norms / rope)"


class Launch(NamedTuple):
    """What one engine step launched: ``kind`` ("prefill", "decode" or None), its rows (decode) or tokens
    (prefill), and the KV tokens a decode step reads."""
    kind: str | None
    size: int
    kv_tokens: int


def launched(before: dict, after: dict) -> Launch:
    """The step launched between two snapshots of ``llm.engine.stats``."""
    if after["decode_steps"] > before["decode_steps"]:
        return Launch("decode", after["decode_tokens"] - before["decode_tokens"],
                      after["decode_kv_tokens"] - before["decode_kv_tokens"])
    if after["prefill_steps"] > before["prefill_steps"]:
        return Launch("prefill", after["prefill_tokens"] - before["prefill_tokens"], 0)
    return Launch(None, 0, 0)


def plan_windows(plan: list[Launch], at: list[int], steps: int, prefill: bool) -> list[tuple[str, int, int]]:
    """(label, first step, end step) of each window to profile, in step order and not overlapping."""
    windows, end = [], 0
    if prefill:
        first = next((i for i, s in enumerate(plan) if s.kind == "prefill"), None)
        if first is not None:
            end = next((i for i in range(first, len(plan)) if plan[i].kind != "prefill"), len(plan))
            windows.append(("prefill", first, end))
    for size in sorted(at, reverse=True):
        first = next((i for i in range(end, len(plan)) if plan[i].kind == "decode" and plan[i].size <= size), None)
        if first is not None:
            end = min(first + steps, len(plan))
            windows.append((f"decode <={size}", first, end))
    return windows


def run_steps(engine, prompts, params, hook=lambda i, phase: None) -> list[Launch]:
    """Add the workload and step the engine until it is done; ``hook(i, phase)`` runs before ("start") and after
    ("end") step ``i``.  Returns what each step launched."""
    for ids, p in zip(prompts, params):
        engine.add_request(ids, p)
    plan = []
    while engine.has_work():
        i, before = len(plan), dict(engine.stats)
        hook(i, "start")
        engine.step()
        plan.append(launched(before, engine.stats))
        hook(i, "end")
    return plan


def category(name: str) -> str:
    if "Memset" in name:  # e.g. a library clearing its output or workspace before a kernel
        return "memset"
    if name.startswith("triton_"):  # Inductor's fused kernels: named after the ops they fuse
        return "sampler" if "argmax" in name else OTHER
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return OTHER


def kernel_events(prof) -> list[tuple[str, int, int]]:
    """(name, start ns, end ns) of every device kernel and memset the profiler saw."""
    import torch
    return [(e.name(), e.start_ns(), e.start_ns() + e.duration_ns()) for e in prof.profiler.kineto_results.events()
            if e.device_type() == torch.autograd.DeviceType.CUDA and "Memcpy" not in e.name()]


def busy_ns(events) -> int:
    """Length of the union of the kernels' intervals (GPU busy time)."""
    total, end = 0, None
    for _, s, e in sorted(events, key=lambda x: x[1]):
        if end is None or s > end:
            total += e - s
            end = e
        elif e > end:
            total += e - end
            end = e
    return total


def idle_before(events) -> dict[tuple[str, str], int]:
    """GPU idle ns between consecutive kernels, by (category before, category after): where launches serialise."""
    out, end, prev = {}, None, None
    for name, s, e in sorted(events, key=lambda x: x[1]):
        if end is not None and s > end:
            key = (prev, category(name))
            out[key] = out.get(key, 0) + s - end
        if end is None or e > end:
            end, prev = e, category(name)
    return out


def busy_by_category(events) -> dict[str, int]:
    """Busy ns per kernel category, each the union of its kernels' intervals: a kernel launched early under PDL
    (made resident while the one before it runs, as the split-KV reduce is) adds only the time it runs alone."""
    groups = {}
    for event in events:
        groups.setdefault(category(event[0]), []).append(event)
    return {cat: busy_ns(group) for cat, group in groups.items()}


def summarize(label: str, events, wall_s: float, window: list[Launch], floor_s: float) -> dict:
    by_cat, by_name = busy_by_category(events), {}
    for name, s, e in events:
        by_name[name] = by_name.get(name, 0) + e - s
    steps = max(len(window), 1)
    ms = lambda ns: round(ns / 1e6 / steps, 3)  # noqa: E731
    sizes = [s.size for s in window if s.kind] or [0]
    return {"window": label, "steps": len(window), "sizes": [min(sizes), max(sizes)],
            "wall_ms": round(1000 * wall_s / steps, 3), "gpu_busy_ms": ms(busy_ns(events)),
            "floor_ms": round(1000 * floor_s / steps, 3), "kernels_per_step": len(events) // steps,
            "by_category_ms": {k: ms(v) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
            "idle_ms": {f"{a} -> {b}": ms(v)
                        for (a, b), v in sorted(idle_before(events).items(), key=lambda kv: -kv[1])[:8]},
            "top_kernels": [[n[:100], ms(v), sum(1 for x in events if x[0] == n) // steps]
                            for n, v in sorted(by_name.items(), key=lambda kv: -kv[1])[:15]]}


def profile_windows(llm, prompts, params, windows, floor_of) -> tuple[list[dict], list[Launch]]:
    """Run the workload once more, profiling each window; returns the summaries and what each step launched."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    starts = {first: (label, end) for label, first, end in windows}
    ends = {end - 1: first for _, first, end in windows}
    state, out = {}, []

    def hook(i, phase):
        if phase == "start" and i in starts:
            torch.cuda.synchronize()
            state.update(first=i, prof=profile(activities=[ProfilerActivity.CUDA]), t=time.perf_counter())
            state["prof"].start()
        elif phase == "end" and i in ends:
            torch.cuda.synchronize()
            wall = time.perf_counter() - state["t"]
            state["prof"].stop()
            out.append((state["first"], i + 1, state["prof"], wall))

    llm.engine.reset_prefix_cache()
    plan = run_steps(llm.engine, prompts, params, hook)
    summaries = []
    for first, end, prof, wall in out:
        window = plan[first:end]
        summaries.append(summarize(starts[first][0], kernel_events(prof), wall, window, floor_of(window)))
    return summaries, plan


def profile_vllm(model: str, steps: int, sizes: list[int], load_format: str = "auto") -> list[dict]:
    """vLLM's windows (module docstring), each decode one once all requests have started and at most its size are
    unfinished; ``load_format`` "dummy" for a config without weights."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams
    llm = LLM(model, skip_tokenizer_init=True, max_model_len=4096, seed=0, max_num_seqs=256, load_format=load_format)
    prompts, params = workload(256, 1024, 1024)
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=8), use_tqdm=False)
    engine, started, out = llm.llm_engine, set(), []
    for i, (ids, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), {"prompt_token_ids": ids},
                           SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=p.max_tokens))
    for label, n, kind, size in (("prefill (first 2 steps)", 2, "prefill", 256),
                                 *[(f"decode {size}", steps, "decode", size) for size in sorted(sizes, reverse=True)]):
        while kind == "decode" and engine.has_unfinished_requests() and (
                len(started) < len(prompts) or engine.get_num_unfinished_requests() > size):
            started.update(o.request_id for o in engine.step() if o.outputs and o.outputs[0].token_ids)
        torch.cuda.synchronize()
        prof, t = profile(activities=[ProfilerActivity.CUDA]), time.perf_counter()
        prof.start()
        for _ in range(n):
            started.update(o.request_id for o in engine.step() if o.outputs and o.outputs[0].token_ids)
        torch.cuda.synchronize()
        wall = time.perf_counter() - t
        prof.stop()
        out.append(summarize(label, kernel_events(prof), wall, [Launch(kind, size, 0)] * n, 0.0))
    return out


def count_experts(llm, prompts, params) -> dict:
    """``--count-experts`` (module docstring): per step kind, the mean distinct experts and busiest expert's rows."""
    import torch
    from nanovllm.kernels import ops
    calls, real = [], ops.fused_moe

    def counting(x, router_logits, w13, w2, top_k, *args, **kwargs):
        ids = torch.topk(router_logits.float(), top_k, dim=-1).indices.flatten()
        calls.append((int(ids.unique().numel()), int(ids.bincount().max()), x.shape[0]))
        return real(x, router_logits, w13, w2, top_k, *args, **kwargs)

    ops.fused_moe = counting
    try:
        plan = run_steps(llm.engine, prompts, params)
    finally:
        ops.fused_moe = real
    layers, out = len(calls) // max(len(plan), 1), {}
    for kind, least in (("decode", 192), ("prefill", 0)):
        picked = [c for i, s in enumerate(plan) if s.kind == kind and s.size >= least
                  for c in calls[i * layers:(i + 1) * layers]]
        if picked:
            mean = [round(sum(c[j] for c in picked) / len(picked), 1) for j in range(3)]
            out[f"{kind} >={least}"] = {"calls": len(picked), "layers": layers, "distinct_mean": mean[0],
                                        "distinct_min": min(picked)[0], "busiest_rows_mean": mean[1],
                                        "tokens_mean": mean[2]}
    return out


def print_windows(summaries: list[dict]) -> None:
    print("| window | steps | sizes | wall ms | GPU busy ms | floor ms | floor/busy | kernels | by category (ms) |\n"
          "|---|---|---|---|---|---|---|---|---|")
    for w in summaries:
        cats = ", ".join(f"{k} {v}" for k, v in w["by_category_ms"].items())
        print(f"| {w['window']} | {w['steps']} | {w['sizes'][0]}-{w['sizes'][1]} | {w['wall_ms']} | "
              f"{w['gpu_busy_ms']} | {w['floor_ms']} | {w['floor_ms'] / max(w['gpu_busy_ms'], 1e-9):.0%} | "
              f"{w['kernels_per_step']} | {cats} |")
    for w in summaries:
        print(f"\nGPU idle between kernels, {w['window']} (ms/step): "
              + ", ".join(f"{k} {v}" for k, v in w["idle_ms"].items()))
        print(f"top kernels, {w['window']} (ms/step, calls/step):")
        for name, t, calls in w["top_kernels"]:
            print(f"  {t:8.3f} {calls:4d}  {name}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=("nanovllm", "vllm"), default="nanovllm", help="which engine to profile")
    p.add_argument("--model", help="HF checkpoint dir (default: bench.py's synthesized Qwen3-0.6B)")
    p.add_argument("--steps", type=int, default=10, help="engine steps per decode window")
    p.add_argument("--at", default="256,192,128,64,32,8", help="running-batch sizes to profile a window at")
    if p.parse_known_args()[0].engine == "vllm":
        p.add_argument("--load-format", default="auto", help="vLLM's load_format (dummy: a config's random weights)")
        args = p.parse_args()
        summaries = profile_vllm(args.model, args.steps, positive_ints(args.at, "--at"), args.load_format)
        print_windows(summaries)
        return write_json("profile_run_vllm.json", {"engine": "vllm", "model": args.model, "windows": summaries})
    from nanovllm import LLM, SamplingParams
    from nanovllm.cli import add_engine_args
    p.add_argument("--bs", type=int, default=256, help="max_num_seqs and the largest decode bucket")
    p.add_argument("--num-seqs", type=int, default=256, help="requests in bench's workload (256; ours only)")
    p.add_argument("--prefill", action="store_true", help="also profile the first run of prefill steps")
    p.add_argument("--count-experts", action="store_true", help="count the experts MoE routing picks (eager)")
    add_engine_args(p, skip=("model", "max_num_seqs"), defaults={"max_model_len": 4096})
    args = p.parse_args()
    args.enforce_eager = args.count_experts or getattr(args, "enforce_eager", False)
    if min(args.steps, args.bs, args.num_seqs) < 1:
        p.error(f"--steps, --bs and --num-seqs must be >= 1, got {args.steps}, {args.bs} and {args.num_seqs}")
    llm = LLM(args.model or default_model(), **llm_kwargs(args, args.bs))
    info = llm.engine.describe()
    if info["device_type"] != "cuda":
        p.error(f"profile_run.py profiles CUDA kernels; the engine runs on {info['device']}")
    bandwidth = copy_bandwidth()

    def floor_of(window: list[Launch]) -> float:
        return sum(info["weight_bytes"] + s.kv_tokens * info["kv_bytes_per_token"]
                   for s in window if s.kind == "decode") / bandwidth

    prompts, params = workload(args.num_seqs, 1024, 1024)
    llm.generate([[1, 2, 3, 4]], SamplingParams(), use_tqdm=False)
    if args.count_experts:
        counts = count_experts(llm, prompts, params)
        print(json.dumps(counts, indent=1))
        return write_json("expert_counts.json", {"engine": info, "counts": counts})
    plan = run_steps(llm.engine, prompts, params)
    windows = plan_windows(plan, positive_ints(args.at, "--at"), args.steps, args.prefill)
    summaries, second = profile_windows(llm, prompts, params, windows, floor_of)
    if second != plan:
        print("note: the profiled pass launched other steps than the planning pass; windows may be off")
    print_windows(summaries)
    write_json("profile_run.json", {"engine": info, "copy_gbps": round(bandwidth / 1e9, 1), "windows": summaries})


if __name__ == "__main__":
    main()
