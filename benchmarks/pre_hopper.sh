#!/usr/bin/env bash
# The pre-Hopper CUDA path, run on a Hopper GPU: NANOVLLM_HOPPER_FEATURES=0 turns off TMA loads and programmatic
# dependent launch (Triton's and Inductor's), the two features nanovllm takes only from sm_90 on.  Kernel checks and
# parity with transformers (float32 token-identical, bfloat16 under the logprob-margin rule) with the features off,
# then `bench.py --bs 256` with them off and on, alternating, two fresh processes each.  Logs and JSON are packed
# into $OUT/pre_hopper.tgz (the GPU tool returns few files).
#
#     bash benchmarks/pre_hopper.sh       # on the GPU machine, from the repository root
REAL_OUT=${OUT:-results}
export OUT=/tmp/nanovllm-results/pre_hopper
source benchmarks/gpu_steps.sh
export NANOVLLM_CACHE_DIR="${NANOVLLM_CACHE_DIR:-/tmp/nanovllm-bench-cache}"
nvidia-smi --query-gpu=name --format=csv,noheader
step checks_off 150 env NANOVLLM_HOPPER_FEATURES=0 python benchmarks/kernel_checks.py
step parity_off 300 env NANOVLLM_HOPPER_FEATURES=0 python benchmarks/gpu_parity.py
for round in 1 2; do
  step "bench_off_r$round" 300 env NANOVLLM_HOPPER_FEATURES=0 python bench.py --bs 256 --json "$OUT/off_r$round.json"
  step "bench_on_r$round" 300 python bench.py --bs 256 --json "$OUT/on_r$round.json"
done
grep -h "ready in" "$OUT"/bench_*.log | grep -o "hopper_features=[A-Za-z]*" | sort | uniq -c
runs_table "o*_r*.json"
tar czf "$REAL_OUT/pre_hopper.tgz" -C /tmp/nanovllm-results pre_hopper
