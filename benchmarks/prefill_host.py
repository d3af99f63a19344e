"""Host time of bench's prefill steps: how long the host takes to queue each one, and where that time goes.

    python benchmarks/prefill_host.py [--model DIR] [--top 30] [--profiler cprofile|torch|none]

Runs bench.py's workload once after its warm-up, with the host side of every prefill launch timed and the whole
prefill phase under a profiler (stopped at the first decode launch): cProfile (Python functions; it slows the
host about 3x), torch.profiler (own CPU time per op and per CUDA runtime call) or none (clean timings).  A
prefill whose host launch takes longer than the device's work on the step before it leaves the GPU idle; the
first launch of a run is never hidden.  Prints per-step host milliseconds and the top functions by own and
cumulative time; writes $OUT/prefill_host.json.
"""
import argparse
import cProfile
import io
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import workload  # noqa: E402
from nanovllm import LLM, SamplingParams  # noqa: E402
from common import default_model, write_json  # noqa: E402  (benchmarks/common.py)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--bs", type=int, default=256)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--profiler", choices=("cprofile", "torch", "none"), default="cprofile")
    args = p.parse_args()
    llm = LLM(args.model or default_model(), max_num_seqs=args.bs, max_model_len=4096)
    runner = llm.engine.runner
    profiler = make_profiler(args.profiler)
    steps, state = [], {"on": False, "done": False}
    plain_launch, plain_prepare = runner.launch, runner.prepare_prefill
    prepare_ms = []

    def prepare(batch):
        t = time.perf_counter()
        out = plain_prepare(batch)
        prepare_ms.append(1000 * (time.perf_counter() - t))
        return out

    def launch(batch):
        if batch.is_prefill and not state["done"]:
            if not state["on"]:
                profiler.enable()
                state["on"] = True
            t = time.perf_counter()
            handle = plain_launch(batch)
            steps.append({"tokens": sum(batch.num_new_tokens), "seqs": len(batch.seqs),
                          "host_launch_ms": round(1000 * (time.perf_counter() - t), 2),
                          "prepare_ms": round(prepare_ms[-1], 2)})
            return handle
        if state["on"] and not state["done"]:
            profiler.disable()
            state["done"] = True
        return plain_launch(batch)

    prompts, params = workload(256, 1024, 1024)
    llm.generate([[1, 2, 3, 4]], SamplingParams(), use_tqdm=False)
    runner.launch, runner.prepare_prefill = launch, prepare
    llm.generate(prompts, params, use_tqdm=False)
    print("| prefill step | tokens | sequences | host launch ms | of which input preparation ms |\n|---|---|---|---|---|")
    for i, s in enumerate(steps):
        print(f"| {i} | {s['tokens']} | {s['seqs']} | {s['host_launch_ms']} | {s['prepare_ms']} |")
    report = {}
    if args.profiler == "torch":
        report["self_cpu"] = profiler.table(sort_by="self_cpu_time_total", row_limit=args.top,
                                            max_name_column_width=70)
        print(report["self_cpu"])
    for key in ("tottime", "cumulative") if args.profiler == "cprofile" else ():
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats(key).print_stats(args.top)
        report[key] = text.getvalue()
        print(f"\n--- top {args.top} by {key}\n" + "\n".join(report[key].splitlines()[6:]))
    write_json("prefill_host.json", {"steps": steps, "profile": report})


class _TorchProfiler:
    """torch.profiler behind cProfile's enable/disable."""

    def __init__(self):
        from torch.profiler import ProfilerActivity, profile
        self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])

    def enable(self):
        self.prof.start()

    def disable(self):
        self.prof.stop()

    def table(self, **kwargs) -> str:
        return self.prof.key_averages().table(**kwargs)


class _NoProfiler:
    def enable(self):
        pass

    def disable(self):
        pass


def make_profiler(kind: str):
    return {"cprofile": cProfile.Profile, "torch": _TorchProfiler, "none": _NoProfiler}[kind]()


if __name__ == "__main__":
    main()
