#!/usr/bin/env bash
# The GPU call behind docs/PERFORMANCE.md's current numbers: exactness and speed of the fused kernels, the bench
# (3 timed runs in one process, the first process of the call), parity with transformers, the per-kernel profile
# (decode windows and the prefill steps), then the eager bench.  Logs and JSON to $OUT.
#
#     bash benchmarks/performance_md.sh       # on the GPU machine, from the repository root
source benchmarks/gpu_steps.sh
export NANOVLLM_CACHE_DIR="${NANOVLLM_CACHE_DIR:-/tmp/nanovllm-bench-cache}"
nvidia-smi --query-gpu=name --format=csv,noheader
step checks 150 python benchmarks/kernel_checks.py
step bench 240 python bench.py --bs 256 --repeat 3 --json "$OUT/bench.json"
step parity 240 python benchmarks/gpu_parity.py
step profile 180 python benchmarks/profile_run.py --prefill
step eager 240 python bench.py --bs 256 --enforce-eager --json "$OUT/bench_eager.json"
grep -h "ready in" "$OUT"/*.log | cut -c1-220
