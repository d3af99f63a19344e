#!/usr/bin/env bash
# A/B whole source trees on one GPU machine: `python bench.py` in each tree, in interleaved rounds (A B C A B C),
# each a fresh process, so that drift of the lent machine falls on every tree alike.  Prints one line per timed
# run (tok/s, prefill, decode and other seconds) and writes each run's JSON to $OUT.
#
# Make the trees of older commits here, in a folder that .git/info/exclude ignores, and carry it along:
#
#     echo /.ab/ >> .git/info/exclude; mkdir -p .ab/base; git archive REV | tar -x -C .ab/base
#     TREES=". .ab/base" ROUNDS=2 REPEAT=3 bash benchmarks/tree_ab.sh    # on the GPU machine (carry .ab)
#
# BENCH_ARGS (default "--bs 256") go to every bench run.  Round 1 of each tree compiles cold (each tree has
# its own compile-cache entry, its source differs); later rounds start warm.
source benchmarks/gpu_steps.sh
TREES=${TREES:-.}
ROUNDS=${ROUNDS:-2}
REPEAT=${REPEAT:-2}
BENCH_ARGS=${BENCH_ARGS:---bs 256}
for round in $(seq 1 "$ROUNDS"); do
  for tree in $TREES; do
    dir=$(cd "$tree" && pwd)
    label=$(basename "$dir")
    [ "$tree" = . ] && label=head
    # shellcheck disable=SC2086
    step "${label}_r$round" 400 env PYTHONPATH="$dir" python "$dir/bench.py" $BENCH_ARGS --repeat "$REPEAT" \
      --json "$OUT/${label}_r$round.json"
  done
done
python - "$OUT" <<'EOF'
import glob, json, os, sys
print("| run | tok/s | seconds | prefill s | decode s | other s |\n|---|---|---|---|---|---|")
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*_r[0-9]*.json"))):
    runs = json.load(open(path))
    for r in runs if isinstance(runs, list) else [runs]:
        other = r["seconds"] - r["prefill_seconds"] - r["decode_seconds"]
        print(f"| {os.path.basename(path)[:-5]} | {r['tok_per_s']:.0f} | {r['seconds']:.3f} | {r['prefill_seconds']:.3f}"
              f" | {r['decode_seconds']:.3f} | {other:.3f} |")
EOF
