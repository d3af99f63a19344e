#!/usr/bin/env bash
# Expert offload and low-rank experts on one GPU, Mixtral-8x7B's config with dummy weights.  Steps:
#   ours    offload_bench.py: offload, device budget 16 GB, one expert per layer on the device, batch 1 and 16,
#           prefetch $PREFETCH (default off; "on,off" for both), host shares $HOST_SHARES (default 0,0.45), host
#           threads $HOST_THREADS (default torch's own); PROFILE=1 adds a profile of batch 1 (offload_profile.txt)
#   vllm    peer_offload.py: vLLM 0.26 with cpu_offload_gb at the same budget (vLLM staged in /tmp/site)
#   host    host_experts.py: one Mixtral expert's pinned copy against the host computing it, and both at once
#   svd     compress_experts --rank 256 (pca, config only), then bench.py --bs 256 on the compressed config
#   full    bench.py --bs 256 on the uncompressed config (needs ~100 GB of device memory: nvidia-h200)
#
#     STEPS="ours vllm svd" bash benchmarks/offload_gpu.sh
#
# Logs and JSON stay in /tmp/nanovllm-results/offload while the machine is warm; each call packs them into
# $OUT/offload.tgz.
REAL_OUT=${OUT:-results}
export OUT=/tmp/nanovllm-results/offload
source benchmarks/gpu_steps.sh
export NANOVLLM_CACHE_DIR=/tmp/nanovllm-offload-cache PYTHONUNBUFFERED=1
CFG=/tmp/mixtral-8x7b-config SVD=/tmp/mixtral-8x7b-svd256
[ -f $CFG/config.json ] || python -m nanovllm.tools.synthesize mixtral-8x7b $CFG --config-only > /dev/null
BENCH="python bench.py --bs 256 --load-format dummy --max-model-len 4096"
for s in ${STEPS:-ours vllm svd}; do
  case $s in
    ours) step ours 480 python benchmarks/offload_bench.py --model $CFG --budget-gb 16 --experts-on-device 1 \
            --batch-sizes 1,16 --max-tokens 32 --prefetch ${PREFETCH:-off} --host-shares ${HOST_SHARES:-0,0.45} \
            --host-threads "${HOST_THREADS:-}" ${PROFILE:+--profile} ;;
    vllm) step vllm 480 env PYTHONPATH=/tmp/site VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_USE_FLASHINFER_SAMPLER=0 \
            python3 benchmarks/peer_offload.py --model $CFG --budget-gb 16 --cpu-offload-gb 80 \
            --batch-sizes 1,16 --max-tokens 32 --out "$OUT" ;;
    host) step host 240 python benchmarks/host_experts.py --overlap 8 ;;
    svd) step compress 120 python -m nanovllm.tools.compress_experts $CFG $SVD --rank 256 --method pca
         step svd 360 $BENCH --model $SVD --json "$OUT/svd.json" ;;
    full) step full 420 $BENCH --model $CFG --json "$OUT/full.json" ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
grep -h "ready in\|offload\|weights" "$OUT"/*.log 2>/dev/null | grep -v Warn | tail -8
cat "$OUT"/offload_bench.md 2>/dev/null
grep -h "^| " "$OUT"/host.log 2>/dev/null
ls "$OUT"/svd.json "$OUT"/full.json > /dev/null 2>&1 && runs_table "[sf]*.json"
tar czf "$REAL_OUT/offload.tgz" -C /tmp/nanovllm-results offload
