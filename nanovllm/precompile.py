"""Warm the compile cache ahead of time, or inspect and clear it.

    python -m nanovllm.precompile --model PATH [any LLM(...) option as a flag, e.g. --graph-batch-sizes 16,32]
                                  [--variants logprobs processed forward sample ...]
    python -m nanovllm.precompile --list
    python -m nanovllm.precompile --clear

Warming builds ``LLM(...)`` with the same arguments, so it fills exactly the entry that a later ``LLM(...)``
with those arguments looks up, and prints the per-bucket compile times and the total.  ``--variants`` also builds
those variants of the step for every bucket (``nanovllm.step.VARIANTS``: logprobs; processed, for penalties;
processed_logprobs; forward and sample, the halves of a step that samples under a grammar; sample_logprobs), which
are otherwise built, and cached, when a request first needs one.
"""
import argparse
import time

from nanovllm.cli import add_engine_args, engine_kwargs
from nanovllm.step import VARIANTS


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF checkpoint directory or hub repo id org/name")
    p.add_argument("--list", action="store_true", help="list cache entries (key fields, size, age)")
    p.add_argument("--clear", action="store_true", help="remove every cache entry")
    p.add_argument("--variants", nargs="+", default=[], choices=VARIANTS,
                   help="also build these variants of the step for every bucket")
    add_engine_args(p)
    args = p.parse_args(argv)
    from nanovllm.compile import cache
    if args.list:
        entries = cache.list_entries()
        for e in entries:
            print(f"{e['key']}  {e['architectures']} {e['dtype']} buckets={e['buckets']} step={e['step']} "
                  f"kv_blocks={e['num_kv_blocks']} {e['platform']} ({e['device_arch']})  {e['size_mb']} MB  "
                  f"{e['age_hours']} h old  {e['path']}")
        print(f"{len(entries)} entries under {cache.compile_cache_dir()}")
        return
    if args.clear:
        print(f"removed {cache.clear_entries()} entries from {cache.compile_cache_dir()}")
        return
    if not args.model:
        p.error("--model is required unless --list or --clear is given")
    from nanovllm import LLM
    start = time.perf_counter()
    llm = LLM(args.model, **engine_kwargs(args))
    d = llm.engine.describe()
    if d["mode"] != "graph":
        print("this model runs eagerly; nothing to precompile")
        return
    executor = llm.engine.runner.executor
    for size, graph in sorted(executor.graphs.items()):
        print(f"bucket {size:4d}: {graph.compile_seconds:6.1f} s")
    entry = executor.cache
    print(f"total: {time.perf_counter() - start:.1f} s for LLM(...) init, {executor.compile_seconds:.1f} s of it "
          f"compiling; cache {d['compile_cache']}; step {d['step_origin']}; key {entry.key} at {entry.entry}")
    for variant in args.variants:
        start = time.perf_counter()
        llm.engine.build_variant_graphs(variant)  # on every rank of a tensor-parallel engine
        print(f"{variant} variant: {time.perf_counter() - start:.1f} s for buckets "
              f"{executor.variant_graph_sizes(variant)}")


if __name__ == "__main__":
    main()
