#!/usr/bin/env bash
# Serving on the GPU: our server (python -m nanovllm.serve) and vLLM's (vllm.entrypoints.openai.api_server), same
# Qwen3-0.6B-shaped checkpoint, each driven by our client (benchmarks/serve_bench.py) and by vLLM's (`vllm bench
# serve`, random dataset of like lengths) at a light, a medium and a saturating request rate.  Steps:
#   ours    our server as users start it (the engine in a process of its own), both clients
#   depths  ours at pipeline depths 1 and 3 (the default is 2), our client, medium and saturating
#   vllm    vLLM's server as users start it (its engine core in a process of its own), both clients
#   vllm1   vLLM's server with VLLM_ENABLE_V1_MULTIPROCESSING=0 (one process), our client, medium and saturating
#
#     STEPS="ours depths" bash benchmarks/serve_gpu.sh   # on the GPU machine; vLLM staged in /tmp/site (../shared/peers)
#     STEPS="vllm ours" bash benchmarks/serve_gpu.sh
#     TOKENIZER=DIR ...                              # tokenizer files to add to a checkpoint that has none
#     MODEL=DIR N=8 CLIENT_ARGS="--max-output-len 8" STEPS=ours bash benchmarks/serve_gpu.sh   # a smoke test
#
# Logs and JSON stay in /tmp/nanovllm-results/serve (kept while the machine is warm); each call packs all of it into
# $OUT/serve.tgz.  Fastapi, uvicorn and pydantic come from the staged vLLM's wheels, installed into /tmp/site.
REAL_OUT=${OUT:-results}
export OUT=/tmp/nanovllm-results/serve
source benchmarks/gpu_steps.sh
export NANOVLLM_CACHE_DIR=/tmp/nanovllm-serve-cache PYTHONUNBUFFERED=1
MODEL=${MODEL:-$(python -c "from benchmarks.common import default_model; print(default_model())")}
N=${N:-256}  # prompts per run at the medium and saturating rates; half of it at the light rate
if [ ! -f "$MODEL/tokenizer.json" ]; then  # both servers need one; synthesize writes one only where it has it
  [ -n "${TOKENIZER:-}" ] || { echo "$MODEL has no tokenizer: set TOKENIZER=DIR"; exit 2; }
  cp "$TOKENIZER"/* "$MODEL"/
fi
VP="env PYTHONPATH=/tmp/site VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_USE_FLASHINFER_SAMPLER=0"  # vLLM's client
VSERVE="env PYTHONPATH=/tmp/site VLLM_USE_FLASHINFER_SAMPLER=0"
OURS="env PYTHONPATH=$PWD:/tmp/site python -m nanovllm.serve $MODEL --served-model-name qwen3"
URL=http://127.0.0.1:8000

up() {  # up NAME CMD...: start a server, wait for /health (at most 300 s)
  local name=$1; shift
  "$@" > "$OUT/$name.server.log" 2>&1 &
  SERVER=$!
  for _ in $(seq 300); do curl -sf "$URL/health" > /dev/null && { echo "$name up after $((SECONDS - T0))s"; return; }
    kill -0 "$SERVER" 2> /dev/null || break; sleep 1; done
  echo "$name did not come up"; tail -20 "$OUT/$name.server.log"
}
down() { kill "$SERVER"; wait "$SERVER" 2> /dev/null; pkill -f "vllm.entrypoints.openai|nanovllm.serve"; sleep 3; }
ours_client() {  # ours_client NAME RATES NUM_PROMPTS
  step "$1" 300 python benchmarks/serve_bench.py --model qwen3 --request-rate "$2" --num-prompts "$3" --json "$1.json" \
    ${CLIENT_ARGS:-}
}
vllm_client() {  # vllm_client NAME RATE NUM_PROMPTS
  step "$1" 300 $VP python3 -c 'import sys; from vllm.entrypoints.cli.main import main; sys.argv[0] = "vllm"; main()' \
    bench serve --backend openai --base-url "$URL" --model qwen3 --tokenizer "$MODEL" --dataset-name random \
    --random-input-len 562 --random-output-len 562 --random-range-ratio 0.82 --num-prompts "$3" --request-rate "$2" \
    --ignore-eos --temperature 0.6 --seed 0 --percentile-metrics ttft,tpot,itl,e2el \
    --save-result --result-dir "$OUT" --result-filename "$1.json"
}
clients() {  # clients PREFIX: both clients at the three rates
  ours_client "$1_ours_light" 4 $((N / 2)); ours_client "$1_ours_load" 16,inf "$N"
  vllm_client "$1_vb_light" 4 $((N / 2)); vllm_client "$1_vb_medium" 16 "$N"; vllm_client "$1_vb_sat" inf "$N"
}
for s in ${STEPS:-ours vllm}; do
  case $s in
    ours) up ours $OURS; clients nano; down ;;
    depths) for d in 1 3; do
              up "ours_d$d" $OURS --pipeline-depth $d; ours_client "nano_d${d}_load" 16,inf "$N"; down
            done ;;
    vllm|vllm1) [ "$s" = vllm ] && server=$VSERVE || server=$VP
          up "$s" $server python3 -m vllm.entrypoints.openai.api_server --model "$MODEL" --served-model-name qwen3 \
            --load-format dummy --max-model-len 4096 --max-num-seqs 256 --seed 0 --port 8000
          if [ "$s" = vllm ]; then clients vllm; else ours_client vllm1_load 16,inf "$N"; fi; down ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
tar czf "$REAL_OUT/serve.tgz" -C /tmp/nanovllm-results serve
