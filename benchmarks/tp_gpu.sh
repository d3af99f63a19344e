#!/usr/bin/env bash
# Tensor parallelism on two GPUs (nvidia-h200-x2): `bench.py --bs 256` on the Qwen3-32B config with dummy weights
# at tensor_parallel_size 2 and 1, and vLLM at TP 2 beside it (../shared/peers: its configs/ and peer_vllm.py in
# /tmp/vl, vLLM in /tmp/site).  Steps:
#   ar        allreduce_bench.py: NCCL against symmetric memory's one-shot and two-shot all-reduce
#   tp2       ours at TP 2 (default all-reduce); tp2nccl: the same with NANOVLLM_ALLREDUCE=nccl
#   prof2     profile_run.py at TP 2: GPU time by kernel category (collectives apart) against the byte floor
#   tp1       ours at TP 1;  vllm: vLLM 0.26 at TP 2
# Each bench step's process must also exit by itself (a hang at shutdown hits the step's limit, rc=124).
#
#     STEPS="ar tp2 tp2nccl" bash benchmarks/tp_gpu.sh; STEPS="vllm tp1" bash benchmarks/tp_gpu.sh
#
# Logs and JSON stay in /tmp/nanovllm-results/tp while the machine is warm; each call packs all of it into
# $OUT/tp.tgz (the GPU tool returns few files).  Runs of one step are numbered.
REAL_OUT=${OUT:-results}
export OUT=/tmp/nanovllm-results/tp
source benchmarks/gpu_steps.sh
export NANOVLLM_CACHE_DIR=/tmp/nanovllm-tp-cache PYTHONUNBUFFERED=1
CFG=/tmp/qwen3-32b
mkdir -p $CFG && cp /tmp/vl/configs/qwen3-32b.json $CFG/config.json
BENCH="python bench.py --bs 256 --model $CFG --load-format dummy"
next() { n=1; while [ -e "$OUT/$1_$n.log" ]; do n=$((n + 1)); done; echo "$1_$n"; }
for s in ${STEPS:-tp2 tp1 vllm}; do
  case $s in
    tp2) name=$(next tp2); step "$name" 300 $BENCH --tensor-parallel-size 2 --json "$OUT/$name.json" ;;
    tp2nccl) name=$(next tp2nccl); step "$name" 300 env NANOVLLM_ALLREDUCE=nccl $BENCH --tensor-parallel-size 2 \
               --json "$OUT/$name.json" ;;
    ar) step "$(next ar)" 180 python benchmarks/allreduce_bench.py --gpus 2 --hidden 5120 ;;
    prof2) step "$(next prof2)" 300 python benchmarks/profile_run.py --model $CFG --load-format dummy \
             --tensor-parallel-size 2 --at 256,64,8 --steps 8 ;;
    tp1) name=$(next tp1); step "$name" 360 $BENCH --json "$OUT/$name.json" ;;
    vllm) step "$(next vllm)" 360 env PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0 python3 /tmp/vl/peer_vllm.py \
            --config /tmp/vl/configs/qwen3-32b.json --tp 2 --out "$OUT" ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
grep -h "ready in" "$OUT"/*.log 2>/dev/null | tail -4
runs_table "tp*.json"
tar czf "$REAL_OUT/tp.tgz" -C /tmp/nanovllm-results tp
