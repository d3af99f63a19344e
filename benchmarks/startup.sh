#!/usr/bin/env bash
# Cold and warm `LLM(...)` start-up of bench.py's engine (Qwen3-0.6B, the 14 default buckets), then bench.py.
#
#     bash benchmarks/startup.sh        # on the GPU machine, from the repository root; logs in $OUT
#
# Python's bytecode cache: a normal `pip install` writes .pyc files, but the lent GPU image ships torch without
# them and sets PYTHONDONTWRITEBYTECODE=1, so there every process compiles ~1,400 torch modules from source.
# The script times one warm start as the image runs (no bytecode cache), then lets Python write the cache
# (PYTHONPYCACHEPREFIX) and times, with it: a cold start (empty compile cache) and two warm ones.
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NANOVLLM_CACHE_DIR="${NANOVLLM_CACHE_DIR:-/tmp/nanovllm-startup-cache}"
export OUT="${OUT:-results}"
mkdir -p "$OUT"
run() {  # run NAME LIMIT: one init_profile start, its JSON line printed
  timeout "$2" python benchmarks/init_profile.py --no-cprofile > "$OUT/$1.log" 2>&1
  echo "$1: $(grep -E '^\{"imports_s' "$OUT/$1.log")"
}
python benchmarks/init_profile.py --no-cprofile > /dev/null 2>&1  # synthesizes the model, fills the compile cache
run warm_no_bytecode_cache 90
export PYTHONPYCACHEPREFIX=/tmp/nanovllm-pycache
unset PYTHONDONTWRITEBYTECODE
python -c "import torch._inductor.codecache, torch._dynamo, triton, transformers" 2>/dev/null  # write .pyc once
rm -rf "$NANOVLLM_CACHE_DIR/compile" ~/.triton/cache
run cold 150
run warm1 90
run warm2 90
timeout 120 python bench.py --bs 256 --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
grep -E "^Total" "$OUT/bench.log"
