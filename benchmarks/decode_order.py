"""A/B of the decode row order on bench.py's workload: longest context first (the scheduler's order) against
the running order (admission order, as before), alternated on one engine so both see the same GPU.

    python benchmarks/decode_order.py [--rounds 2]          # prints a table, writes $OUT/decode_order.json
"""
import argparse
import json
import os
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench import run_once  # noqa: E402
from nanovllm import LLM  # noqa: E402
from common import default_model, out_dir  # noqa: E402  (benchmarks/common.py)


def running_order(scheduler):
    """Make ``scheduler`` hand out decode rows in its running order again (undoing the longest-first sort)."""
    plain = type(scheduler)._schedule_decode

    def schedule_decode(self):
        batch = plain(self)
        rank = {id(s): i for i, s in enumerate(self.running)}
        batch.seqs.sort(key=lambda s: rank[id(s)])
        return batch
    scheduler._schedule_decode = types.MethodType(schedule_decode, scheduler)
    return lambda: vars(scheduler).pop("_schedule_decode")


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    if args.model is None:
        args.model = default_model()
    llm = LLM(args.model, max_num_seqs=256, max_model_len=4096)
    bench_args = types.SimpleNamespace(num_seqs=256, max_input_len=1024, max_output_len=1024)
    rows = []
    for _ in range(args.rounds):
        for order in ("running", "longest_first"):
            undo = running_order(llm.engine.scheduler) if order == "running" else None
            r = run_once(llm, bench_args)
            if undo:
                undo()
            rows.append({"order": order, **{k: r[k] for k in ("tok_per_s", "seconds", "decode_step_ms",
                                                             "decode_vs_floor", "decode_by_batch")}})
            print(f"| {order} | {r['tok_per_s']:.0f} | {r['seconds']:.2f} | {r['decode_step_ms']:.3f} | "
                  f"{r['decode_vs_floor']} |", flush=True)
    out = out_dir()
    with open(os.path.join(out, "decode_order.json"), "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
