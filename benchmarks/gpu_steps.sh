# The step runner of the one-call GPU scripts (performance_md.sh, ab.sh); source it, don't run it.
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
# prints a markdown table of every timed run in the bench JSON files $OUT/GLOB (tok/s and its time split),
# then one of the mean by configuration (a file's name without its _rN round suffix).
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
import glob, json, os, re, sys
runs = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], sys.argv[2]))):
    data = json.load(open(path))
    runs += [(os.path.basename(path)[:-5], r) for r in (data if isinstance(data, list) else [data])]
print("| run | tok/s | seconds | prefill s | decode s | other s |\n|---|---|---|---|---|---|")
for name, r in runs:
    other = r["seconds"] - r["prefill_seconds"] - r["decode_seconds"]
    print(f"| {name} | {r['tok_per_s']:.0f} | {r['seconds']:.3f} | {r['prefill_seconds']:.3f}"
          f" | {r['decode_seconds']:.3f} | {other:.3f} |")
groups = {}
for name, r in runs:
    groups.setdefault(re.sub(r"_r\d+$", "", name), []).append(r)
print("\n| configuration | runs | mean tok/s | min-max tok/s | mean decode s |\n|---|---|---|---|---|")
for name, rs in groups.items():
    tps = [r["tok_per_s"] for r in rs]
    print(f"| {name} | {len(rs)} | {sum(tps) / len(tps):.0f} | {min(tps):.0f}-{max(tps):.0f}"
          f" | {sum(r['decode_seconds'] for r in rs) / len(rs):.3f} |")
PY
}
