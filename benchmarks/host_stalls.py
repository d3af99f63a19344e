"""Where a bench run's slow decode steps come from: the device, the host's own work, or another thread.

    python benchmarks/host_stalls.py --bs 256 [--repeat 3] [--spy-rate 250] [--blocks ascending] [--pause 20]

Runs bench.py's workload (same options) and keeps every engine step's times (``Engine.step_log``).  A decode step
is slow when it takes more than 15% (and 1 ms) over the median of its neighbours; runs of slow steps are
reported as clusters, their extra time split into

- ``wait``: the host blocked on the device (the device was slower, or started late),
- ``launch``: scheduling, preparing and launching the next step, before the wait,
- ``after``: resolving tokens and bookkeeping after the wait,
- ``gap``: time between engine steps, in ``LLM.generate``'s own loop,

with the garbage collections that fell inside.  If ``py-spy`` is on the PATH it is attached (non-blocking) during
each timed run, once recording which thread holds the GIL and once every thread's running stacks: a thread other
than the main one that holds the GIL makes the main thread wait for it after every device wait.  Everything goes
to ``$OUT/host_stalls.json`` and ``$OUT/spy_*.txt``; the tables go to stdout.  Also printed: the process's threads
and children, the GPU's NUMA node, and per run the main thread's CPU migrations and context switches.  Options for
the later-run slowdown (docs/PERFORMANCE.md): ``--blocks`` sets the free KV blocks' order before each run,
``--pause`` idles the GPU between runs, ``--pin-main`` pins the engine loop to one CPU.  ``--inject-stall 8,50``
sleeps 8 ms before every 50th decode launch of the timed runs, to see how much of a known stall the engine's queue
(``--pipeline-depth``) hides.  py-spy's wheel can be
carried to the GPU machine (``pip download py-spy``, then ``pip install --no-deps`` there).
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import bench  # noqa: E402  (the repository root's bench.py)
from common import default_model, out_dir, write_json  # noqa: E402  (benchmarks/common.py)


def step_table(log: dict) -> dict[str, np.ndarray]:
    """Columns of the step log, plus ``after`` (host work after the wait) and ``gap`` (time before the step)."""
    cols = {name: np.array([row[i] for row in log["steps"]]) for i, name in enumerate(log["fields"])}
    for name in ("seqs", "start_ms", "ms", "wait_ms", "launch_ms"):
        cols[name] = cols[name].astype(float)
    cols["after_ms"] = cols["ms"] - cols["wait_ms"] - cols["launch_ms"]
    cols["gap_ms"] = np.diff(cols["start_ms"], prepend=cols["start_ms"][0]) - np.r_[0.0, cols["ms"][:-1]]
    return cols


def rolling_median(x: np.ndarray, half: int) -> np.ndarray:
    return np.array([np.median(x[max(0, i - half):i + half + 1]) for i in range(len(x))])


def slow_clusters(log: dict, factor: float = 1.15, min_extra_ms: float = 1.0, half: int = 25) -> list[dict]:
    """Runs of decode steps slower than ``factor`` x the median of their neighbours, with their extra time split."""
    cols = step_table(log)
    idx = np.flatnonzero(cols["kind"] == "decode")
    parts = ("ms", "wait_ms", "launch_ms", "after_ms", "gap_ms")
    d = {k: cols[k][idx] for k in parts + ("seqs", "start_ms")}
    base = {k: rolling_median(d[k], half) for k in parts}
    slow = (d["ms"] + d["gap_ms"] > factor * (base["ms"] + base["gap_ms"])) & \
           (d["ms"] + d["gap_ms"] - base["ms"] - base["gap_ms"] > min_extra_ms)
    clusters, i = [], 0
    while i < len(slow):
        if not slow[i]:
            i += 1
            continue
        j = i
        while j + 1 < len(slow) and (slow[j + 1] or (j + 2 < len(slow) and slow[j + 2])):
            j += 1
        sel = slice(i, j + 1)
        start, end = d["start_ms"][i] - d["gap_ms"][i], d["start_ms"][j] + d["ms"][j]
        clusters.append({
            "start_s": round(start / 1000, 3), "steps": j - i + 1,
            "seqs": f"{int(d['seqs'][sel].min())}-{int(d['seqs'][sel].max())}",
            "extra_ms": {k.replace("_ms", ""): round(float((d[k][sel] - base[k][sel]).sum()), 1) for k in parts},
            "gc_ms": round(sum(ms for t, _, ms in log["gc"] if start <= t <= end), 1)})
        i = j + 1
    return clusters


def spy_summary(path: str, top: int = 8) -> list[str]:
    """Lines of a py-spy raw file (``--threads``): samples per thread, and each thread's heaviest leaf frames."""
    threads: dict[str, dict[str, int]] = {}
    with open(path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            frames = stack.split(";")
            leaves = threads.setdefault(frames[0], {})
            leaf = frames[-1] if len(frames) > 1 else "(no Python frame)"
            leaves[leaf] = leaves.get(leaf, 0) + int(count)
    out = []
    for name, leaves in sorted(threads.items(), key=lambda kv: -sum(kv[1].values())):
        out.append(f"  {name}: {sum(leaves.values())} samples")
        for leaf, n in sorted(leaves.items(), key=lambda kv: -kv[1])[:top]:
            out.append(f"      {n:6d}  {leaf[:110]}")
    return out


def start_spies(rate: int, tag: str) -> list[tuple[subprocess.Popen, str]]:
    """Attach py-spy to this process twice: GIL holders only, and every running thread."""
    if not shutil.which("py-spy") or rate <= 0:
        return []
    spies = []
    for kind, flags in (("gil", ["--gil"]), ("threads", [])):
        path = os.path.join(out_dir(), f"spy_{kind}_{tag}.txt")
        cmd = ["py-spy", "record", "--pid", str(os.getpid()), "--nonblocking", "--threads", "--rate", str(rate),
               "--format", "raw", "--output", path, *flags]
        spies.append((subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT), path))
    time.sleep(2.0)  # let both attach before the timed run starts
    return spies


def stop_spies(spies) -> list[str]:
    for proc, _ in spies:
        proc.send_signal(signal.SIGINT)
    for proc, _ in spies:
        proc.wait(timeout=60)
    return [path for _, path in spies if os.path.exists(path)]


def thread_sched() -> dict[str, int]:
    """The calling thread's scheduler counters: CPU migrations and (involuntary) context switches."""
    out = {}
    with open("/proc/thread-self/sched") as f:
        for line in f:
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("se.nr_migrations", "nr_switches", "nr_involuntary_switches"):
                out[key.split(".")[-1]] = int(float(value))
    return out


def gpu_numa() -> list[str]:
    """The GPU's NUMA node and the CPUs of each node (where the engine loop had best run)."""
    import glob
    import torch
    lines = []
    props = torch.cuda.get_device_properties(torch.cuda.current_device()) if torch.cuda.is_available() else None
    pci = [getattr(props, f"pci_{k}_id", None) for k in ("domain", "bus", "device")]
    if None not in pci:  # the properties hold the PCI address as integers
        address = "%04x:%02x:%02x.0" % tuple(pci)
        path = f"/sys/bus/pci/devices/{address}/numa_node"
        node = open(path).read().strip() if os.path.exists(path) else "unknown"
        lines.append(f"  GPU at PCI {address}: NUMA node {node}")
    for node in sorted(glob.glob("/sys/devices/system/node/node[0-9]*/cpulist")):
        lines.append(f"  {node.split('/')[-2]}: CPUs {open(node).read().strip()}")
    lines.append(f"  this process may run on CPUs {sorted(os.sched_getaffinity(0))}")
    return lines


def order_free_blocks(block_manager, order: str, seed: int) -> None:
    """Make the next allocations take free blocks in ``order``: "ascending" block ids (as a fresh engine does)
    or "shuffle" (a seeded random permutation); "keep" leaves the order the previous run left."""
    from collections import OrderedDict
    if order == "keep":
        return
    blocks = sorted(block_manager.free_blocks)
    if order == "shuffle":
        blocks = list(np.random.default_rng(seed).permutation(blocks))
    block_manager.free_blocks = OrderedDict.fromkeys(int(b) for b in blocks)


def describe_process() -> list[str]:
    """This process's Python threads and child processes (a busy one competes with the engine loop)."""
    lines = [f"  thread {t.name} (native {t.native_id}, daemon={t.daemon})" for t in threading.enumerate()]
    children = subprocess.run(["ps", "--ppid", str(os.getpid()), "-o", "pid,pcpu,etime,args", "--no-headers"],
                              capture_output=True, text=True).stdout.splitlines()
    return lines + [f"  child {c.strip()[:120]}" for c in children if "ps --ppid" not in c]


def stalling_schedule(scheduler, ms: float, every: int, injected: list):
    """``scheduler.schedule`` that sleeps ``ms`` ms after every ``every``-th decode batch it schedules, before the
    engine launches it: a host stall of known size.  Appends each stall's ms to ``injected``."""
    plain, count = scheduler.schedule, [0]

    def schedule():
        batch = plain()
        if batch.seqs and not batch.is_prefill:
            count[0] += 1
            if count[0] % every == 0:
                t = time.perf_counter()
                time.sleep(ms / 1000)
                injected.append(1000 * (time.perf_counter() - t))
        return batch
    return schedule


def stall_spec(text: str) -> tuple[float, int]:
    """``--inject-stall``'s "MS,EVERY" as (milliseconds > 0, every-th decode step >= 1)."""
    try:
        ms, every = text.split(",")
        ms, every = float(ms), int(every)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MS,EVERY such as 8,40, got {text!r}") from None
    if ms <= 0 or every < 1:
        raise argparse.ArgumentTypeError(f"MS must be > 0 and EVERY >= 1, got {text!r}")
    return ms, every


def timed_run(llm, args, run: int) -> dict:
    """bench's run_once with the step log kept, the free-block order set, stalls injected, the main thread's
    scheduler counters and py-spy around it; adds the slow clusters."""
    spies = start_spies(args.spy_rate, f"run{run}")
    bm, scheduler = llm.engine.block_manager, llm.engine.scheduler
    plain_reset = bm.reset_prefix_cache  # run_once calls it after its warm-up, right before the timed run
    plain_schedule, injected = scheduler.schedule, []

    def reset():
        plain_reset()
        order_free_blocks(bm, args.blocks, run)
        if args.inject_stall:
            scheduler.schedule = stalling_schedule(scheduler, *args.inject_stall, injected)
    bm.reset_prefix_cache = reset
    sched = thread_sched()
    try:
        r = bench.run_once(llm, args, keep_steps=True)
    finally:
        bm.reset_prefix_cache = plain_reset
        scheduler.schedule = plain_schedule
        spy_files = stop_spies(spies)
    sched = {k: v - sched[k] for k, v in thread_sched().items()}
    return {**r, "clusters": slow_clusters(r["step_log"]), "spy_files": spy_files, "main_thread": sched,
            "injected_ms": [len(injected), round(sum(injected), 1)]}


def report(run: int, r: dict) -> None:
    clusters = r["clusters"]
    print(f"\nrun {run}: {r['tok_per_s']:.0f} tok/s, prefill {r['prefill_seconds']:.3f} s, decode "
          f"{r['decode_seconds']:.3f} s, {len(clusters)} slow clusters, {r['gc']['collections']} collections "
          f"({r['gc']['ms']} ms); main thread: {r['main_thread']}; injected stalls (count, ms): {r['injected_ms']}")
    print("| start s | steps | seqs | extra ms | wait | launch | after | gap | gc ms |\n" + "|---" * 9 + "|")
    for c in clusters:
        e = c["extra_ms"]
        print(f"| {c['start_s']} | {c['steps']} | {c['seqs']} | {e['ms'] + e['gap']:.1f} | {e['wait']:.1f}"
              f" | {e['launch']:.1f} | {e['after']:.1f} | {e['gap']:.1f} | {c['gc_ms']} |")
    total = {k: round(sum(c["extra_ms"][k] for c in clusters), 1) for k in ("ms", "wait", "launch", "after", "gap")}
    print(f"extra ms in clusters: {total}")
    for path in r["spy_files"]:
        print(f"py-spy {os.path.basename(path)}:")
        print("\n".join(spy_summary(path)))


def main():
    p = bench.make_parser(__doc__)
    p.add_argument("--spy-rate", type=int, default=250, help="py-spy samples per second (0: no py-spy)")
    p.add_argument("--pause", type=float, default=0.0, help="seconds to sleep before each timed run but the first")
    p.add_argument("--blocks", choices=("keep", "ascending", "shuffle"), default="keep",
                   help="free KV blocks' order before each timed run (after its warm-up): as left, by id, shuffled")
    p.add_argument("--pin-main", type=int, help="pin the engine loop's thread to this CPU (threads started "
                   "before, such as the CUDA driver's, keep their CPUs)")
    p.add_argument("--inject-stall", type=stall_spec,
                   help="MS,EVERY: sleep MS ms before launching every EVERY-th decode step of the timed runs "
                   "(how much of a known host stall the engine's queue hides: compare --pipeline-depth 1 and 2)")
    args = p.parse_args()
    args.model = args.model or default_model()
    llm = bench.build_llm(args, args.bs, args.enforce_eager)
    print("\n".join(["process:"] + describe_process() + gpu_numa()))
    if args.pin_main is not None:
        os.sched_setaffinity(0, {args.pin_main})  # pid 0: the calling thread only
        print(f"  engine loop pinned to CPU {args.pin_main}")
    results = []
    for run in range(args.repeat):
        if run and args.pause:
            time.sleep(args.pause)
        r = timed_run(llm, args, run)
        results.append({**bench.describe(llm), **r})
        report(run, r)
    print(f"wrote {write_json('host_stalls.json', results)}")


if __name__ == "__main__":
    main()
