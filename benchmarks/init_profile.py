"""Where `LLM(...)` start-up time goes: times bench.py's engine start and profiles it with cProfile.

    python benchmarks/init_profile.py [--model DIR] [--bs 256] [--no-cprofile]
                                                      # writes $OUT/init_profile_{hit,miss}.{json,prof}

Run it twice in a row to see a cold start (empty compile cache) and a warm one.
"""
import argparse
import cProfile
import io
import json
import os
import pstats
import time
from common import default_model, out_dir as results_dir  # noqa: E402  (benchmarks/common.py)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model")
    p.add_argument("--bs", type=int, default=256)
    p.add_argument("--top", type=int, default=35)
    p.add_argument("--no-cprofile", action="store_true", help="time start-up only (cProfile slows tracing)")
    p.add_argument("--only", help="also print cumulative time of functions whose path matches this regex")
    p.add_argument("--callers", help="also print who calls functions matching this regex")
    args = p.parse_args()
    out_dir = results_dir()
    t = time.perf_counter()
    import torch  # noqa: F401  (import time is part of a user's start-up, reported separately)
    from nanovllm import LLM
    imports = time.perf_counter() - t
    if args.model is None:
        args.model = default_model()
    profiler = None if args.no_cprofile else cProfile.Profile()
    t = time.perf_counter()
    if profiler:
        profiler.enable()
    llm = LLM(args.model, max_num_seqs=args.bs, max_model_len=4096)
    if profiler:
        profiler.disable()
    init = time.perf_counter() - t
    executor = llm.engine.runner.executor
    result = {"imports_s": round(imports, 2), "init_s": round(init, 2),
              "graph_setup_s": round(getattr(executor, "compile_seconds", 0.0), 2),
              "phases_s": llm.engine.runner.init_phases,
              "cache": None if not hasattr(executor, "cache") else ("hit" if executor.cache.hit else "miss"),
              "step": getattr(executor, "step_origin", None),
              "step_seconds": round(getattr(executor, "trace_seconds", 0.0), 2),
              "buckets": {size: round(g.compile_seconds, 2) for size, g in getattr(executor, "graphs", {}).items()}}
    if profiler:
        profiler.dump_stats(os.path.join(out_dir, f"init_profile_{result['cache']}.prof"))
    for key in ("cumulative", "tottime") if profiler else ():
        s = io.StringIO()
        pstats.Stats(profiler, stream=s).sort_stats(key).print_stats(args.top)
        print(s.getvalue()[-12000:] if key == "cumulative" else s.getvalue()[-6000:])
    for restriction, method in ((args.only, "print_stats"), (args.callers, "print_callers")):
        if profiler and restriction:
            s = io.StringIO()
            getattr(pstats.Stats(profiler, stream=s).sort_stats("cumulative"), method)(restriction, args.top)
            print(s.getvalue()[-8000:])
    from torch._dynamo.utils import compile_times
    print("PyTorch compile phases (seconds):\n" + str(compile_times(repr="str", aggregate=True)))
    print(json.dumps(result))
    with open(os.path.join(out_dir, f"init_profile_{result['cache']}.json"), "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
