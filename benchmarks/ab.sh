#!/usr/bin/env bash
# A/B runner: `python bench.py` for every combination of source tree x flag set x env-var set, each a fresh
# process, in interleaved rounds (every combination once, then again), so that drift of the lent machine falls
# on every combination alike.  Ends with a legend and one table (every run, then the mean per combination).
#
#     TREES=". .ab/base" FLAGS="default|--pipeline-depth 2" ENVS="default|NANOVLLM_PDL=0" bash benchmarks/ab.sh
#
# TREES: space-separated source trees (default "."); make those of older commits here, in a folder that
#   .git/info/exclude ignores, and carry it to the GPU machine:
#     echo /.ab/ >> .git/info/exclude; mkdir -p .ab/base; git archive REV | tar -x -C .ab/base
#   A tree's first round compiles cold (its source differs, so its compile-cache entry does); later rounds are warm.
# FLAGS: '|'-separated sets of extra bench arguments; ENVS: '|'-separated sets of space-separated VAR=value;
#   "default" (the default of both) is the empty set.
# ROUNDS (default 2), REPEAT (timed runs per process, default 1), BENCH_ARGS (every run, default "--bs 256").
# Each run's log and JSON go to $OUT/<tree>_f<i>_e<j>_r<round>.{log,json} ("head" is the tree ".").
source benchmarks/gpu_steps.sh
TREES=${TREES:-.}
FLAGS=${FLAGS:-default}
ENVS=${ENVS:-default}
ROUNDS=${ROUNDS:-2}
REPEAT=${REPEAT:-1}
BENCH_ARGS=${BENCH_ARGS:---bs 256}
IFS='|' read -r -a flag_sets <<< "$FLAGS"
IFS='|' read -r -a env_sets <<< "$ENVS"
for round in $(seq 1 "$ROUNDS"); do
  for tree in $TREES; do
    dir=$(cd "$tree" && pwd)
    name=$(basename "$dir")
    [ "$tree" = . ] && name=head
    for i in "${!flag_sets[@]}"; do
      flags=${flag_sets[$i]}
      [ "$flags" = default ] && flags=
      for j in "${!env_sets[@]}"; do
        envs=${env_sets[$j]}
        [ "$envs" = default ] && envs=
        run="${name}_f${i}_e${j}_r$round"
        # shellcheck disable=SC2086
        step "$run" 400 env PYTHONPATH="$dir" $envs python "$dir/bench.py" $BENCH_ARGS $flags \
          --repeat "$REPEAT" --json "$OUT/$run.json"
      done
    done
  done
done
for i in "${!flag_sets[@]}"; do echo "f$i: ${flag_sets[$i]}"; done
for j in "${!env_sets[@]}"; do echo "e$j: ${env_sets[$j]}"; done
runs_table '*_f[0-9]*_e[0-9]*_r[0-9]*.json'
