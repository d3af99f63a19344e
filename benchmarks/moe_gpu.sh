#!/usr/bin/env bash
# Mixtures of experts on the GPU: bf16/fp32 parity of the tiny MoE checkpoints, the fused MoE kernel at Qwen3-30B-A3B's
# and Mixtral's shapes (1 to 4096 tokens), then `bench.py --bs 256` on the real Qwen3-30B-A3B config with dummy
# weights: graph mode with an empty compile cache (cold start), again (warm start), eager, and vLLM beside it.
#
#     STEPS="parity kernels" bash benchmarks/moe_gpu.sh      # on the GPU machine, from the repository root
#     STEPS="cold warm" bash benchmarks/moe_gpu.sh; STEPS="vllm warm eager" bash benchmarks/moe_gpu.sh
#                                       # vllm: vLLM staged in /tmp/site (../shared/peers); each warm run is numbered
#
# Every log and JSON stays in /tmp/nanovllm-results/moe, which persists while the machine is warm; each call packs
# all of it into $OUT/moe.tgz (the GPU tool returns few files).
REAL_OUT=${OUT:-results}
export OUT=/tmp/nanovllm-results/moe
source benchmarks/gpu_steps.sh
export NANOVLLM_CACHE_DIR=/tmp/nanovllm-moe-cache PYTHONUNBUFFERED=1
CFG=/tmp/qwen3-30b-a3b
[ -f $CFG/config.json ] || python -m nanovllm.tools.synthesize qwen3-30b-a3b $CFG --config-only > /dev/null
BENCH="python bench.py --bs 256 --model $CFG --load-format dummy"
VP="env PYTHONPATH=/tmp/site VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_USE_FLASHINFER_SAMPLER=0"
for s in ${STEPS:-parity kernels cold warm eager vllm}; do
  case $s in
    parity) step parity 300 python benchmarks/gpu_parity.py --archs qwen3_moe,mixtral,qwen2_moe --no-bench ;;
    kernels) step kernel_qwen3 240 python benchmarks/moe_kernel.py --tokens 1,16,64,256,1024,4096
             step kernel_mixtral 240 python benchmarks/moe_kernel.py --shape mixtral --tokens 1,16,64,256,1024,4096 ;;
    cold) rm -rf "$NANOVLLM_CACHE_DIR"; step bench_cold 420 $BENCH --json "$OUT/bench_cold.json" ;;
    warm) n=1; while [ -e "$OUT/bench_warm$n.json" ]; do n=$((n + 1)); done  # a later call's warm run adds one
          step "bench_warm$n" 300 $BENCH --json "$OUT/bench_warm$n.json" ;;
    eager) step bench_eager 360 $BENCH --enforce-eager --json "$OUT/bench_eager.json" ;;
    vllm) step vllm 420 $VP python3 /tmp/vl/peer_vllm.py --config /tmp/vl/configs/qwen3-30b-a3b.json --out "$OUT" ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
grep -h "ready in" "$OUT"/bench_*.log 2>/dev/null | head -3
runs_table "bench_*.json"
tar czf "$REAL_OUT/moe.tgz" -C /tmp/nanovllm-results moe
