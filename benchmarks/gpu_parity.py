"""Parity with transformers on a GPU: tiny random Qwen3/Qwen2/Llama in float32 (token-identical) and bfloat16
(logprob-margin rule), eager and graph mode, then bench.py's first 8 prompts on Qwen3-0.6B in bf16 graph mode.

    python benchmarks/gpu_parity.py                  # writes $OUT/gpu_parity_<archs>.json, prints a table
    python benchmarks/gpu_parity.py --archs qwen3_moe,mixtral,qwen2_moe --no-bench   # tiny MoE checkpoints only
    python benchmarks/gpu_parity.py --bench-only     # only the Qwen3-0.6B check, with bench.py's engine settings

With ``--bench-only`` the engine is configured exactly as ``python bench.py --bs 256`` (256 sequences, the
default buckets, max_model_len 4096), so it reuses that run's compile cache.  Exits non-zero on a mismatch.
"""
import argparse
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
# tests/conftest.py runs the Triton kernels in the interpreter unless told otherwise; here they run on the GPU
os.environ.setdefault("TRITON_INTERPRET", "0")
from bench import workload  # noqa: E402
from benchmarks.common import default_model, print_verdicts, write_json  # noqa: E402
from conftest import build_checkpoint  # noqa: E402  (tests/conftest.py: tiny random checkpoints)
from nanovllm.tools import oracle  # noqa: E402



def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench-only", action="store_true")
    p.add_argument("--archs", default="qwen3,qwen2,llama,llama3",
                   help="tiny random checkpoints to check (tests/conftest.py's make_config names)")
    p.add_argument("--no-bench", action="store_true", help="skip the Qwen3-0.6B check on bench.py's prompts")
    args = p.parse_args()
    rows = []
    tmp = tempfile.mkdtemp()
    for arch in () if args.bench_only else args.archs.split(","):
        path = build_checkpoint(os.path.join(tmp, arch), arch)
        for dtype in ("float32", "bfloat16"):
            for eager in (True, False):
                v = oracle.run(path, dtype, "cuda", 8, 24, 0.1, enforce_eager=eager, kvcache_block_size=16,
                               graph_batch_sizes=[8], max_model_len=512, max_num_seqs=8, num_kvcache_blocks=256)
                rows.append({"model": arch, "dtype": dtype, "mode": "eager" if eager else "graph", "verdicts": v})
    if not args.no_bench:
        rows.append(bench_prompts_row(args.bench_only))
    write_json(f"gpu_parity_{'bench' if args.bench_only else args.archs.replace(',', '_')}.json", rows)
    sys.exit(1 if print_verdicts(rows) else 0)


def bench_prompts_row(bench_only: bool) -> dict:
    """Qwen3-0.6B in bf16 graph mode on bench.py's first 8 prompts (with bench's engine settings if asked)."""
    prompts = workload(8, 1024, 1024)[0]
    settings = dict(max_num_seqs=256, max_model_len=4096) if bench_only else \
        dict(max_num_seqs=8, max_model_len=2048, num_kvcache_blocks=64)
    v = oracle.run(default_model(), "bfloat16", "cuda", 8, 32, 0.1, prompts=prompts, **settings)
    return {"model": "qwen3-0.6b (bench prompts 0-7)", "dtype": "bfloat16", "mode": "graph", "verdicts": v}


if __name__ == "__main__":
    main()
