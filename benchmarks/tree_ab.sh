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
runs_table '*_r[0-9]*.json'
