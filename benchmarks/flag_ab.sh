#!/usr/bin/env bash
# A/B bench.py flags on one GPU machine: each variant in interleaved rounds (A B A B), each a fresh process, so
# that drift of the lent machine falls on every variant alike.  Prints one line per timed run.
#
#     VARIANTS="default|--prefill-graph-sizes none" ROUNDS=2 REPEAT=2 bash benchmarks/flag_ab.sh
#
# VARIANTS: '|'-separated extra bench arguments ("default": none).  BENCH_ARGS (default "--bs 256") go to every
# run.  The table at the end (gpu_steps.sh's runs_table) lists every run's JSON in $OUT.
source benchmarks/gpu_steps.sh
VARIANTS=${VARIANTS:-default}
ROUNDS=${ROUNDS:-2}
REPEAT=${REPEAT:-2}
BENCH_ARGS=${BENCH_ARGS:---bs 256}
IFS='|' read -r -a variants <<< "$VARIANTS"
for round in $(seq 1 "$ROUNDS"); do
  for i in "${!variants[@]}"; do
    extra=${variants[$i]}
    [ "$extra" = default ] && extra=
    # shellcheck disable=SC2086
    step "v${i}_r$round" 400 python bench.py $BENCH_ARGS $extra --repeat "$REPEAT" --json "$OUT/v${i}_r$round.json"
  done
done
for i in "${!variants[@]}"; do echo "v$i: ${variants[$i]}"; done
runs_table 'v*_r[0-9]*.json'
