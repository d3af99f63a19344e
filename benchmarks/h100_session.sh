#!/usr/bin/env bash
# One GPU call that measures what issues #6 and #7 ask for; logs and JSON go to $OUT (default ./results).
#
#     bash benchmarks/h100_session.sh            # on the GPU machine, from the repository root
#
# In order: decode-attention variants at bench's mixed lengths; a cold start (empty compile cache) timed
# without the profiler; a warm start under cProfile (where its seconds go); bench.py --bs 256 warm with each
# decode variant in $VARIANTS; bench's first 8 prompts against transformers (bf16, logprob-margin rule); GPU
# time per kernel at several batch sizes (profile_run.py).  Each step has its own time limit, so one that
# hangs does not cost the rest.  SKIP="mixed profile" leaves steps out.
source benchmarks/gpu_steps.sh
export NANOVLLM_CACHE_DIR="${NANOVLLM_CACHE_DIR:-/tmp/nanovllm-bench-cache}"
VARIANTS="${VARIANTS:-legacy}"

nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv,noheader
step mixed 150 python benchmarks/decode_mixed.py
rm -rf "$NANOVLLM_CACHE_DIR/compile"  # a cold start (the synthesized checkpoint stays)
step cold 200 python benchmarks/init_profile.py --no-cprofile
grep -E '^\{"imports_s' "$OUT/cold.log"
step warm 120 python benchmarks/init_profile.py --top 25
grep -E '^\{"imports_s' "$OUT/warm.log"
for v in $VARIANTS; do
  NANOVLLM_DECODE_VARIANT=$v step "bench_$v" 120 python bench.py --bs 256 --json "$OUT/bench_$v.json"
done
step parity 180 python benchmarks/gpu_parity.py --bench-only
step profile 150 python benchmarks/profile_run.py
python - <<'EOF'
import glob, json, os
out = os.environ["OUT"]
rows = []
for path in sorted(glob.glob(f"{out}/bench_*.json")):
    r = json.load(open(path))
    rows.append(f"| {r['decode_attention']} | {r['tok_per_s']:.0f} | {r['seconds']:.2f} | {r['decode_step_ms']:.2f} | "
                f"{r['decode_vs_floor']} | {r['init_seconds']} ({r.get('compile_cache')}, {r.get('step')}) |")
table = "| decode attention | tok/s | s | decode ms/step | floor/decode | init s |\n|---|---|---|---|---|---|\n"
table += "\n".join(rows)
print(table)
open(f"{out}/summary.md", "w").write(table + "\n")
EOF
