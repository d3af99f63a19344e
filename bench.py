"""nano-vllm's throughput benchmark, reproduced exactly, and a batch-size sweep.

    python bench.py --bs 256                          # the headline number
    python bench.py --sweep-bs 16,32,64,128,256 [--plot sweep.png]

The workload is nano-vllm's (``benchmarks.common.workload``: 256 sequences, 142,827 input and 133,966 output
tokens; temperature 0.6, ignore_eos, max_model_len 4096); one warm-up generate, then one timed.
``--max-input-len`` and ``--max-output-len`` replace its two 1024s and must be at least 100.  The tokens counted
are the tokens generated; a run whose count differs from the sum of ``max_tokens`` fails.

Engine options are the flags of ``nanovllm/cli.py``; ``--bs`` sets ``max_num_seqs`` and drops decode buckets
above it.  Without ``--model`` a random-weight Qwen3-0.6B is synthesized once and cached.  Each run prints
nano-vllm's ``Total: ...`` line, then a JSON line: ``llm.engine.describe()``, the time split into prefill, decode
and the rest, host and device-wait time per step, and the decode byte floor (CUDA only).
"""
import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.common import (MIN_LEN, copy_bandwidth, decode_floor_seconds, default_model, llm_kwargs,
                               step_weight_bytes, workload)
from nanovllm import LLM, SamplingParams
from nanovllm.cli import add_engine_args, engine_kwargs, flag_name


class TokenCountMismatch(RuntimeError):
    """The engine generated another number of tokens than the workload asks for."""


def int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from None


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("--model", help="HF checkpoint dir (default: synthesized random-weight Qwen3-0.6B)")
    p.add_argument("--bs", type=int, default=256, help="max_num_seqs and the largest decode bucket")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--max-input-len", type=int, default=1024, help=f"longest prompt (>= {MIN_LEN})")
    p.add_argument("--max-output-len", type=int, default=1024, help=f"largest max_tokens (>= {MIN_LEN})")
    p.add_argument("--repeat", type=int, default=1,
                   help="time the workload this many times in one process, each with an empty prefix cache")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="on every request (1 is off); the step's processed variant is built before timing")
    p.add_argument("--json", help="also write the result(s) to this file")
    p.add_argument("--sweep-bs", type=int_list,
                   help="run the bench once per max batch size, each in a fresh process, and print a table")
    p.add_argument("--plot", help="with --sweep-bs: save a PNG of throughput and decode step time vs its floor")
    add_engine_args(p, skip=("model", "max_num_seqs"), defaults={"max_model_len": 4096})
    return p


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``parser.error`` (exit 2) on a value the workload or the engine cannot take."""
    for flag, value, least, why in (
            ("--num-seqs", args.num_seqs, 1, ""), ("--bs", args.bs, 1, ""), ("--repeat", args.repeat, 1, ""),
            ("--max-input-len", args.max_input_len, MIN_LEN,
             f": nano-vllm's workload draws prompt lengths from randint({MIN_LEN}, max-input-len)"),
            ("--max-output-len", args.max_output_len, MIN_LEN,
             f": nano-vllm's workload draws max_tokens from randint({MIN_LEN}, max-output-len)")):
        if value < least:
            parser.error(f"{flag} must be >= {least}{why}, got {value}")
    if args.sweep_bs is not None and (not args.sweep_bs or min(args.sweep_bs) < 1):
        parser.error(f"--sweep-bs must list batch sizes >= 1, got {args.sweep_bs}")
    if args.plot and not args.sweep_bs:
        parser.error("--plot needs --sweep-bs")


def engine_argv(kwargs: dict) -> list[str]:
    """The engine flags that ``add_engine_args`` parses back into ``kwargs``."""
    argv = []
    for name, value in kwargs.items():
        if isinstance(value, bool):
            argv.append(flag_name(name) if value else "--no-" + flag_name(name)[2:])
        elif isinstance(value, (list, tuple)):
            argv += [flag_name(name), ",".join(map(str, value)) or "none"]
        elif value is not None:
            argv += [flag_name(name), str(value)]
    return argv


def child_argv(args: argparse.Namespace, bs: int, json_path: str) -> list[str]:
    """The command that runs this bench at max batch size ``bs`` in a fresh process, writing ``json_path``."""
    return [sys.executable, os.path.abspath(__file__), "--model", args.model, "--bs", str(bs),
            "--num-seqs", str(args.num_seqs), "--max-input-len", str(args.max_input_len),
            "--max-output-len", str(args.max_output_len), "--repeat", str(args.repeat), "--json", json_path,
            "--repetition-penalty", str(args.repetition_penalty),
            *engine_argv(engine_kwargs(args))]


def count_generated(outputs: list[dict], params: list[SamplingParams]) -> int:
    """Tokens ``llm.generate`` returned; under ignore_eos they must add up to the sum of ``max_tokens``."""
    generated = sum(len(out["token_ids"]) for out in outputs)
    expected = sum(p.max_tokens for p in params)
    if generated != expected:
        raise TokenCountMismatch(f"the engine generated {generated} tokens but the workload asks for {expected} "
                                 f"(sum of max_tokens, ignore_eos): the throughput would be wrong")
    return generated


def decode_by_batch(log: list) -> dict:
    """Decode steps and wall seconds by running-batch size range (where the decode time goes)."""
    edges = [1, 16, 64, 128, 192, 256, 1 << 30]
    out = {}
    for lo, hi in zip(edges, edges[1:]):
        times = [r.seconds for r in log if r.kind == "decode" and lo <= r.seqs < hi]
        if times:
            label = f"{lo}-{hi - 1}" if hi < 1 << 30 else f">={lo}"
            out[label] = {"steps": len(times), "seconds": round(sum(times), 3)}
    return out


def summarize(stats: dict, seconds: float, tokens: int, input_tokens: int, log: list) -> dict:
    """One timed run's JSON fields from the engine's ``stats`` and its step log."""
    steps = max(stats["decode_steps"], 1)
    engine_steps = max(stats["decode_steps"] + stats["prefill_steps"], 1)
    return {
        "tokens": tokens, "input_tokens": input_tokens, "seconds": round(seconds, 3),
        "tok_per_s": round(tokens / seconds, 2),
        "prefill_seconds": round(stats["prefill_time"], 3), "decode_seconds": round(stats["decode_time"], 3),
        # generate's time outside engine steps: prompt checks and adding requests before the first step
        "other_seconds": round(seconds - stats["prefill_time"] - stats["decode_time"], 3),
        "decode_steps": stats["decode_steps"], "decode_step_ms": round(1000 * stats["decode_time"] / steps, 3),
        "host_prepare_ms_per_step": round(1000 * stats["decode_prepare_time"] / steps, 3),
        # host work per engine step and time blocked on the device: the host overlaps the device, so host work
        # costs throughput only where it exceeds the device's step time
        "host_ms_per_step": round(1000 * stats["host_time"] / engine_steps, 3),
        "device_wait_ms_per_step": round(1000 * stats["wait_time"] / engine_steps, 3),
        "preemptions": stats["preemptions"], "decode_kv_tokens": stats["decode_kv_tokens"],
        "pipeline_depth_at_end": stats.get("pipeline_depth"), "decode_by_batch": decode_by_batch(log),
        "prefill_step_ms": [round(1000 * r.seconds, 1) for r in log if r.kind == "prefill"],
    }


def gc_timer(out: list):
    """A ``gc.callbacks`` hook appending (generation, seconds) of each collection to ``out``."""
    start = [0.0]

    def hook(phase, info):
        if phase == "start":
            start[0] = time.perf_counter()
        else:
            out.append((info["generation"], time.perf_counter() - start[0]))
    return hook


def allocator_counts(cuda: bool) -> dict:
    """Cumulative device allocations, frees and allocation retries of torch's caching allocator (CUDA only)."""
    if not cuda:
        return {}
    stats = torch.cuda.memory_stats()
    return {k: stats.get(k, 0) for k in ("num_device_alloc", "num_device_free", "num_alloc_retries")}


def add_floor(result: dict, info: dict, bandwidth: float | None) -> None:
    """Add the decode byte floor (weights per step + KV read, at ``bandwidth`` bytes/s) to a run's fields; the
    weights per step are the run's ``decode_weight_bytes_per_step`` (``run_once``) where it has them."""
    floor = None if not bandwidth else decode_floor_seconds(
        result["decode_steps"], result["decode_kv_tokens"],
        result.get("decode_weight_bytes_per_step", info["weight_bytes"]),
        info["kv_bytes_per_token"], bandwidth)
    result["copy_bandwidth_gbps"] = None if not bandwidth else round(bandwidth / 1e9, 1)
    result["decode_floor_seconds"] = None if floor is None else round(floor, 3)
    result["decode_vs_floor"] = None if floor is None else round(floor / max(result["decode_seconds"], 1e-9), 3)


def run_once(llm, args, info: dict) -> dict:
    """One warm-up and one timed generate of the workload, with an empty prefix cache and zeroed stats."""
    prompts, params = workload(args.num_seqs, args.max_input_len, args.max_output_len)
    for p in params:
        p.repetition_penalty = args.repetition_penalty
    llm.generate([[1, 2, 3, 4]], SamplingParams(), use_tqdm=False)  # warm-up, as nano-vllm does
    engine = llm.engine
    if args.repetition_penalty != 1:  # the variant's graphs, built when first asked for, are built before timing
        engine.build_variant_graphs("processed")  # on every rank of a tensor-parallel engine
    engine.reset_stats()
    engine.reset_prefix_cache()  # a repeated run must prefill in full, like the first
    cuda = info["device_type"] == "cuda"
    allocator = allocator_counts(cuda)
    collections = []
    hook = gc_timer(collections)
    gc.callbacks.append(hook)
    engine.step_log = []
    t = time.perf_counter()
    try:
        outputs = llm.generate(prompts, params, use_tqdm=False)
    finally:
        seconds = time.perf_counter() - t
        gc.callbacks.remove(hook)
        log, engine.step_log = engine.step_log, None
    tokens = count_generated(outputs, params)
    result = summarize(engine.stats, seconds, tokens, sum(map(len, prompts)), log)
    # the weights a decode step reads: all of them, except the experts no token of the step was routed to (MoE)
    sizes = [r.seqs for r in log if r.kind == "decode"]
    result["decode_weight_bytes_per_step"] = round(sum(
        step_weight_bytes(b, info["weight_bytes"], info.get("expert_bytes", 0), info.get("expert_share", 0.0))
        for b in sizes) / max(len(sizes), 1)) if sizes else info["weight_bytes"]
    # what the caching allocator did during the run (each device malloc or retry synchronises) and the garbage
    # collections (a full one stalls the host for milliseconds)
    result["allocator"] = {k: v - allocator[k] for k, v in allocator_counts(cuda).items()}
    result["gc"] = {"collections": len(collections), "ms": round(1000 * sum(d for _, d in collections), 1),
                    "full": sum(1 for g, _ in collections if g == 2)}
    return result


def bench_process(args) -> list[dict]:
    """Build the engine at ``--bs`` and time the workload ``--repeat`` times."""
    kwargs = llm_kwargs(args, args.bs)
    t = time.perf_counter()
    llm = LLM(args.model, **kwargs)
    init_seconds = time.perf_counter() - t
    info = llm.engine.describe()
    results = []
    for _ in range(args.repeat):
        r = {**info, "torch": torch.__version__, "init_seconds": round(init_seconds, 2),
             **run_once(llm, args, info)}
        results.append(r)
        print(f"Total: {r['tokens']}tok, Time: {r['seconds']:.2f}s, Throughput: {r['tok_per_s']:.2f}tok/s",
              flush=True)
    waits = {k: v for k, v in llm.engine.describe().items() if k.startswith("tp_")}  # tensor parallelism's
    llm.close()
    # the copy ceiling: after the timed runs (PERFORMANCE.md) and the close (beside a live TP=2 engine it hung)
    bandwidth = None
    if info["device_type"] == "cuda":
        device = kwargs.get("device", "cuda")
        bandwidth = copy_bandwidth(device if device.startswith("cuda") else "cuda")
    for r in results:
        add_floor(r, info, bandwidth)
        r.update(waits)
    return results


def sweep(args) -> list[dict]:
    """One fresh process per max batch size (each gets the whole GPU to itself); prints a table."""
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for bs in args.sweep_bs:
            path = os.path.join(tmp, f"bs{bs}.json")
            if (rc := subprocess.run(child_argv(args, bs, path)).returncode) != 0:
                sys.exit(f"bench.py: the run at --bs {bs} failed (exit status {rc})")
            with open(path) as f:
                got = json.load(f)
            results += got if isinstance(got, list) else [got]
    print("| max bs | tok/s | time (s) | decode step (ms) |\n|---|---|---|---|")
    for r in results:
        print(f"| {r['max_num_seqs']} | {r['tok_per_s']:.0f} | {r['seconds']:.2f} | {r['decode_step_ms']:.2f} |")
    if args.plot:
        plot_sweep(results, args.plot)
    return results


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


def main(argv=None):
    parser = make_parser()
    args = parser.parse_args(argv)
    check_args(parser, args)
    if args.model is None:
        args.model = default_model()
    try:
        results = sweep(args) if args.sweep_bs else bench_process(args)
    except TokenCountMismatch as e:
        sys.exit(f"bench.py: {e}")
    for r in results:
        print(json.dumps(r, default=str))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results if len(results) > 1 else results[0], f, indent=2, default=str)
    return results


if __name__ == "__main__":
    main()
