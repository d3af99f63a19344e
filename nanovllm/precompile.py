"""Warm the compile cache ahead of time, or inspect and clear it.

    python -m nanovllm.precompile --model PATH [--graph-batch-sizes 16,32,...] [--dtype ...] [--device ...]
    python -m nanovllm.precompile --list
    python -m nanovllm.precompile --clear

Warming builds ``LLM(...)`` with the same arguments, so it fills exactly the entry that a later ``LLM(...)``
with those arguments looks up, and prints the per-bucket compile times and the total.
"""
import argparse
import time


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF checkpoint directory")
    p.add_argument("--graph-batch-sizes", type=_ints)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--device", default="auto")
    p.add_argument("--tensor-parallel-size", type=int, default=1)
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=4096)
    p.add_argument("--kvcache-block-size", type=int, default=64)
    p.add_argument("--num-kvcache-blocks", type=int)
    p.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    p.add_argument("--list", action="store_true", help="list cache entries (key fields, size, age)")
    p.add_argument("--clear", action="store_true", help="remove every cache entry")
    args = p.parse_args(argv)
    from nanovllm.compile import cache
    if args.list:
        entries = cache.list_entries()
        for e in entries:
            print(f"{e['key']}  {e['architectures']} {e['dtype']} buckets={e['buckets']} "
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
    llm = LLM(args.model, graph_batch_sizes=args.graph_batch_sizes, dtype=args.dtype, device=args.device,
              tensor_parallel_size=args.tensor_parallel_size, max_num_seqs=args.max_num_seqs,
              max_model_len=args.max_model_len, kvcache_block_size=args.kvcache_block_size,
              num_kvcache_blocks=args.num_kvcache_blocks, gpu_memory_utilization=args.gpu_memory_utilization)
    executor = llm.engine.runner.executor
    if executor.mode != "graph":
        print("this model runs eagerly; nothing to precompile")
        return
    for size, graph in sorted(executor.graphs.items()):
        print(f"bucket {size:4d}: {graph.compile_seconds:6.1f} s")
    entry = executor.cache
    status = "off" if cache.cache_disabled() else "already cached (hit)" if entry.hit else "compiled and saved"
    print(f"total: {time.perf_counter() - start:.1f} s for LLM(...) init, {executor.compile_seconds:.1f} s of it "
          f"compiling; cache {status}; step {executor.step_origin}; key {entry.key} at {entry.entry}")


if __name__ == "__main__":
    main()
