#!/usr/bin/env bash
# Cold and warm `LLM(...)` start-up of bench.py's engine (`--bs 256`: Qwen3-0.6B, the 14 default buckets), then
# bench.py.  Each start is a fresh process that prints one JSON line: import seconds, LLM(...) seconds, whether
# the compile cache hit, where the compiled step came from and seconds by start-up phase (llm.engine.describe()).
#
#     bash benchmarks/startup.sh        # on the GPU machine, from the repository root; logs in $OUT
#
# Python's bytecode cache: a normal `pip install` writes .pyc files, but an image may ship torch without them
# and set PYTHONDONTWRITEBYTECODE=1, so that every process compiles ~1,400 torch modules from source.  The
# script times one warm start as the image runs, then lets Python write the cache (PYTHONPYCACHEPREFIX) and
# times, with it: a cold start (empty compile cache) and two warm ones.
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export NANOVLLM_CACHE_DIR="${NANOVLLM_CACHE_DIR:-/tmp/nanovllm-startup-cache}"
export OUT="${OUT:-results}"
mkdir -p "$OUT"
start() {  # start NAME LIMIT_S: one fresh process builds bench's engine; its JSON line is printed
  timeout "$2" python - > "$OUT/$1.log" 2>&1 <<'PY'
import json
import time

t = time.perf_counter()
import torch  # noqa: F401  (import time is part of a user's start-up, reported on its own)
from nanovllm import LLM
imports = time.perf_counter() - t
from benchmarks.common import default_model
model = default_model()
t = time.perf_counter()
info = LLM(model, max_num_seqs=256, max_model_len=4096).engine.describe()
print(json.dumps({"imports_s": round(imports, 2), "init_s": round(time.perf_counter() - t, 2),
                  **{k: info[k] for k in ("compile_cache", "step_origin", "init_phases")}}, default=str))
PY
  echo "$1: $(grep -E '^\{"imports_s' "$OUT/$1.log")"
}
start prepare 300 > /dev/null  # synthesizes the model, fills the compile cache
start warm_no_bytecode_cache 90
export PYTHONPYCACHEPREFIX=/tmp/nanovllm-pycache
unset PYTHONDONTWRITEBYTECODE
python -c "import torch._inductor.codecache, torch._dynamo, triton, transformers" 2>/dev/null  # write .pyc once
rm -rf "$NANOVLLM_CACHE_DIR/compile" ~/.triton/cache
start cold 150
start warm1 90
start warm2 90
timeout 120 python bench.py --bs 256 --json "$OUT/bench.json" > "$OUT/bench.log" 2>&1
grep -E "^Total" "$OUT/bench.log"
