# Shared by the one-call GPU scripts (performance_md.sh, pdl_ab.sh, h100_session.sh, tree_ab.sh, flag_ab.sh); source it,
# don't run it.
# Sets PYTHONPATH to the repository root and OUT (default ./results, created), and defines
#
#     step NAME LIMIT_S CMD...
#
# which runs CMD with a time limit, its output in $OUT/NAME.log, then prints its exit status, its seconds (and
# the call's so far) and the log's summary lines (bench totals, check counts, tables, errors).  A NAME listed
# in $SKIP is skipped.  Each step has its own limit, so one that hangs does not cost the rest.
#
#     runs_table GLOB
#
# prints a markdown table of every timed run in the bench JSON files $OUT/GLOB (tok/s and its time split).
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OUT="${OUT:-results}"
SKIP="${SKIP:-}"
mkdir -p "$OUT"
T0=$SECONDS

step() {
  local name=$1 limit=$2
  shift 2
  case " $SKIP " in *" $name "*) echo "--- $name: skipped"; return;; esac
  local t=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "--- $name: rc=$? in $((SECONDS - t))s (call $((SECONDS - T0))s)"
  grep -E "^(Total:|mean %|checks:|\| )|Error|error:" "$OUT/$name.log" | tail -16
}

runs_table() {
  python - "$OUT" "$1" <<'PY'
import glob, json, os, sys
print("| run | tok/s | seconds | prefill s | decode s | other s |\n|---|---|---|---|---|---|")
for path in sorted(glob.glob(os.path.join(sys.argv[1], sys.argv[2]))):
    runs = json.load(open(path))
    for r in runs if isinstance(runs, list) else [runs]:
        other = r["seconds"] - r["prefill_seconds"] - r["decode_seconds"]
        print(f"| {os.path.basename(path)[:-5]} | {r['tok_per_s']:.0f} | {r['seconds']:.3f} | {r['prefill_seconds']:.3f}"
              f" | {r['decode_seconds']:.3f} | {other:.3f} |")
PY
}
