#!/usr/bin/env bash
# Vision-language on the GPU: benchmarks/vl_bench.py on Qwen2.5-VL-3B's config with dummy weights, 256 requests
# with one 448x448 image each: ours in graph mode (the tower's share of the run with it), ours eager, and vLLM.
#
#     STEPS="ours eager" bash benchmarks/vl_gpu.sh   # on the GPU machine, from the repository root, with the
#     STEPS="vllm ours" bash benchmarks/vl_gpu.sh    # Qwen tokenizer files in $TOKENIZER (default /tmp/tok) and,
#                                                    # for vllm, vLLM staged in /tmp/site (../shared/peers)
#
# Each run is numbered, so interleaved rounds keep every result.  Logs and JSON stay in /tmp/nanovllm-results/vl
# while the machine is warm; each call packs all of it into $OUT/vl.tgz (the GPU tool returns few files).
REAL_OUT=${OUT:-results}
export OUT=/tmp/nanovllm-results/vl
source benchmarks/gpu_steps.sh
export NANOVLLM_CACHE_DIR=/tmp/nanovllm-vl-cache PYTHONUNBUFFERED=1
TOK=${TOKENIZER:-/tmp/tok}
VP="env PYTHONPATH=/tmp/site VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_USE_FLASHINFER_SAMPLER=0"
next() { n=1; while [ -e "$OUT/$1$n.log" ]; do n=$((n + 1)); done; echo "$1$n"; }
for s in ${STEPS:-ours eager vllm}; do
  case $s in
    ours) step "$(next ours)" 480 python benchmarks/vl_bench.py --engine nanovllm --tokenizer "$TOK" ;;
    eager) step "$(next eager)" 480 python benchmarks/vl_bench.py --engine nanovllm --enforce-eager --tokenizer "$TOK" ;;
    vllm) step "$(next vllm)" 540 $VP python3 benchmarks/vl_bench.py --engine vllm --tokenizer "$TOK" ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
  for f in "$OUT"/vl_*.json; do [ -e "$f" ] && mv "$f" "$OUT/$(basename "$f" .json)_$(date +%s).json"; done
done
grep -h "ready in\|Traceback\|Error" "$OUT"/*.log 2>/dev/null | tail -6
grep -h '^{' "$OUT"/*.log 2>/dev/null
tar czf "$REAL_OUT/vl.tgz" -C /tmp/nanovllm-results vl
