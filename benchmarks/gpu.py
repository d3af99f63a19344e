"""The one GPU runner: named steps of one table (``benchmarks/gpu_steps.py``), results collected.

    python -m benchmarks.gpu STEP [STEP ...] [--out DIR] [--peers DIR] [--site DIR] [--tokenizer DIR]
    python -m benchmarks.gpu --list                      # the table
    python -m benchmarks.gpu bench-ours bench-vllm bench-ours bench-vllm   # interleaved rounds

Steps run in the order given, each run in a folder of its own, ``OUT/NAME-N``, with one log per command and the JSON
its commands wrote (``$OUT`` is that folder). A command runs as a subprocess in a session of its own, so that one
past the step's time limit is stopped with all it started, and it is killed if the runner itself dies. After every
run ``OUT/results.json`` (every run in OUT: its row, commands, exit status, seconds and JSON) and ``OUT/results.md``
(one line per run with its headline numbers) are rewritten. ``--peers`` holds peer_vllm.py and configs/
(../shared/peers, or a staged copy); ``--site`` the folder vLLM's packages were unpacked into (/tmp/site). ``--env
VAR=VALUE`` adds a variable to every command, ``--tree DIR`` runs another source tree of ours (e.g. ``git archive
REV``); both are recorded with each run. ``--dry-run`` prints the commands without running them.
"""
import argparse
import functools
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from benchmarks.gpu_steps import BY_NAME, STEPS, Context, commands

ROOT = Path(__file__).resolve().parent.parent


def default_peers() -> str:
    inside, beside = ROOT / "shared" / "peers", ROOT.parent / "shared" / "peers"
    return str(inside if inside.is_dir() else beside)


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("steps", nargs="*", metavar="STEP", help="step names (see --list)")
    p.add_argument("--list", action="store_true", help="print the table of steps and exit")
    p.add_argument("--out", default=os.environ.get("OUT", "out"), help="results folder (default $OUT or ./out)")
    p.add_argument("--peers", default=os.environ.get("NANOVLLM_PEERS", default_peers()),
                   help="peer_vllm.py and configs/ (default $NANOVLLM_PEERS, else shared/peers or ../shared/peers)")
    p.add_argument("--site", default="/tmp/site", help="vLLM's unpacked packages (../shared/peers/README.md)")
    p.add_argument("--tokenizer", default=os.environ.get("TOKENIZER"), help="Qwen tokenizer files (vl, serve)")
    p.add_argument("--tree", default=str(ROOT), help="the source tree our engine runs from")
    p.add_argument("--port", type=int, default=8000, help="a serve step's server port")
    p.add_argument("--env", action="append", default=[], metavar="VAR=VALUE", help="add to every command")
    p.add_argument("--dry-run", action="store_true", help="print each step's commands without running them")
    args = p.parse_args(argv)
    unknown = [s for s in args.steps if s not in BY_NAME]
    if unknown:
        p.error(f"unknown step(s) {', '.join(map(repr, unknown))}; valid steps: {', '.join(BY_NAME)}")
    if not args.steps and not args.list:
        p.error(f"name at least one step, or --list; valid steps: {', '.join(BY_NAME)}")
    bad = [e for e in args.env if "=" not in e]
    if bad:
        p.error(f"--env takes VAR=VALUE, got {bad}")
    return args


def table() -> str:
    rows = ["| step | engine | model | workload | flags | env |", "|---|---|---|---|---|---|"]
    rows += [f"| {s.name} | {s.engine} | {s.model} | {s.workload} | {' '.join(s.flags)} | "
             f"{' '.join(f'{k}={v}' for k, v in s.env)} |" for s in STEPS]
    return "\n".join(rows)


def run_dir(out: Path, name: str) -> Path:
    n = 1
    while (out / f"{name}-{n}").exists():
        n += 1
    path = out / f"{name}-{n}"
    path.mkdir(parents=True)
    return path


def environment(extra: dict, run: Path) -> dict:
    env = dict(os.environ, OUT=str(run), PYTHONUNBUFFERED="1")
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def die_with_runner(runner: int) -> None:
    """In a step's command, before it runs: have Linux kill it (SIGKILL) when the runner that started it (pid
    ``runner``) dies, so a runner killed from outside (its own time limit, the device's) leaves no step running;
    its tensor-parallel ranks follow their rank 0 (``nanovllm/distributed/liveness.py``)."""
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    if os.getppid() != runner:  # the runner died before the call: nothing would signal this process any more
        os._exit(1)


def stop(proc: subprocess.Popen) -> str:
    """End ``proc`` and everything it started (its own session), politely first; says how it ended."""
    if proc.poll() is not None:
        return f"exited {proc.returncode} before the stop"
    for sig, wait in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        t = time.monotonic()
        os.killpg(proc.pid, sig)
        try:
            return f"exit status {proc.wait(wait)} {time.monotonic() - t:.1f} s after {sig.name}"
        except subprocess.TimeoutExpired:
            pass
    return "still running after SIGKILL"


def healthy(url: str, proc: subprocess.Popen, deadline: float) -> bool:
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(1)
    return False


def execute(step, cmds, run: Path, tree: str, extra_env: dict) -> dict:
    """Run ``cmds`` in order within the step's time limit; a background server is stopped after the others."""
    start, deadline = time.monotonic(), time.monotonic() + step.limit_s
    rcs, servers = [], []
    try:
        for i, cmd in enumerate(cmds):
            with open(run / f"{i}-{cmd.label}.log", "w") as log:
                proc = subprocess.Popen(cmd.argv, cwd=tree, env=environment({**cmd.env, **extra_env}, run),
                                        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                        preexec_fn=functools.partial(die_with_runner, os.getpid()))
            if cmd.background:
                servers.append(proc)
                if not healthy(cmd.background, proc, deadline):
                    rcs.append(proc.poll() if proc.poll() is not None else "no /health")
                    break
                continue
            try:
                rcs.append(proc.wait(max(deadline - time.monotonic(), 1)))
            except subprocess.TimeoutExpired:
                stop(proc)
                rcs.append("timeout")
                break
    finally:
        stopped = [stop(proc) for proc in servers]
    return {"rc": next((rc for rc in rcs if rc != 0), 0), "rcs": rcs, "seconds": round(time.monotonic() - start, 1),
            **({"server": stopped} if stopped else {})}


def collect(run: Path) -> dict:
    found = {}
    for path in sorted(run.glob("*.json")):
        try:
            found[path.name] = json.loads(path.read_text())
        except ValueError as e:
            found[path.name] = {"unreadable": str(e)}
    return found


def headline(record: dict) -> str:
    """The numbers a reader looks for first, from whatever JSON the run wrote (or its last log line)."""
    parts = []
    for name, data in record["results"].items():
        for r in data if isinstance(data, list) else [data]:
            if not isinstance(r, dict):
                continue
            if "tok_per_s" in r:
                parts.append(f"{name[:-5]}: {r['tok_per_s']:,.0f} tok/s, init {r.get('init_seconds')} s"
                             + (f" {r['init_phases']}" if record["step"].startswith("startup") else ""))
            elif "tok_s" in r:
                parts.append(f"{r['tok_s']:,.0f} tok/s, init {r.get('init_s')} s")
            elif "rows" in r and "speculative_config" in r:  # offline_bench.py speculative
                parts.append(", ".join(f"{x['set']} bs {x['batch']} T {x['temperature']} {x['mode']}: "
                                       f"{x['tok_s_per_request']} tok/s/request" for x in r["rows"]))
            elif "rows" in r and all("decode_tok_s" in x for x in r["rows"]):  # offload_bench.py
                parts.append(", ".join(f"bs {x['batch']}: {x['decode_tok_s']} decode tok/s" for x in r["rows"]))
            elif "runs" in r:
                parts += [f"rate {x['request_rate']}: {x['output_throughput']:,.0f} tok/s, TTFT p50 "
                          f"{x['ttft_ms']['p50'] or 0:.0f} ms, TPOT p50 {x['tpot_ms']['p50'] or 0:.1f} ms"
                          + (f", prefix hits {x['prefix_cache']['hit_rate']:.0%}" if isinstance(
                              x.get("prefix_cache"), dict) and x["prefix_cache"]["hit_rate"] is not None else "")
                          for x in r["runs"]]
    if not parts and record.get("log_tail"):
        parts.append(record["log_tail"])
    return "; ".join(parts)


def last_line(run: Path) -> str:
    logs = sorted(run.glob("*.log"))
    lines = [line for line in logs[-1].read_text(errors="replace").splitlines() if line.strip()] if logs else []
    return lines[-1][:200] if lines else ""


def write_summary(out: Path) -> None:
    records = []
    for path in sorted(out.glob("*-*/record.json"), key=lambda p: p.stat().st_mtime):
        records.append(json.loads(path.read_text()))
    (out / "results.json").write_text(json.dumps(records, indent=1, default=str))
    lines = ["| run | engine | model | rc | seconds | result |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['run']} | {r['engine']} | {r['model']} | {r['rc']} | {r['seconds']} | {headline(r)} |"
              for r in records]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def device_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip().replace("\n", ", ")
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def main(argv=None) -> list[dict]:
    args = parse(argv)
    if args.list:
        print(table())
        return []
    out, extra_env = Path(args.out).resolve(), dict(e.split("=", 1) for e in args.env)
    device, records = None if args.dry_run else device_name(), []
    for name in args.steps:
        step = BY_NAME[name]
        run = run_dir(out, name) if not args.dry_run else out / f"{name}-N"
        ctx = Context(run, Path(args.tree).resolve(), Path(args.peers).resolve(), Path(args.site), args.tokenizer,
                      dry=args.dry_run, port=args.port)
        cmds = commands(step, ctx)
        if args.dry_run:
            for cmd in cmds:
                env = " ".join(f"{k}={'' if v is None else v}" for k, v in {**cmd.env, **extra_env}.items())
                print(f"{name}: {'(background) ' if cmd.background else ''}env {env} {' '.join(cmd.argv)}")
            continue
        print(f"--- {run.name}: {step.engine} {step.model} {step.workload}", flush=True)
        result = execute(step, cmds, run, str(ctx.tree), extra_env)
        record = {"run": run.name, "step": name, "engine": step.engine, "model": step.model,
                  "workload": step.workload, "flags": list(step.flags), "env": dict(step.env) | extra_env,
                  "tree": str(ctx.tree), "device": device, "date": time.strftime("%Y-%m-%d %H:%M"),
                  "commands": [" ".join(c.argv) for c in cmds], **result, "results": collect(run),
                  "log_tail": last_line(run)}
        (run / "record.json").write_text(json.dumps(record, indent=1, default=str))
        records.append(record)
        write_summary(out)
        print(f"    rc={record['rc']} in {record['seconds']} s: {headline(record)}", flush=True)
    return records


if __name__ == "__main__":
    sys.exit(0 if all(r["rc"] == 0 for r in main()) else 1)
