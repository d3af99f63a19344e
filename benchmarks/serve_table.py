"""One markdown table of every serving run in a results directory of ``serve_gpu.sh``: our client's JSON
(``serve_bench.py``: a ``runs`` list, one per rate) and vLLM's ``vllm bench serve --save-result`` JSON, side by side.

    python benchmarks/serve_table.py /tmp/nanovllm-results/serve
"""
import glob
import json
import os
import sys


def rows(path: str) -> list[dict]:
    data = json.load(open(path))
    name = os.path.basename(path)[:-5]
    if "runs" in data:  # ours
        return [{"run": name, "rate": r["request_rate"], "done": r["completed"], "tok/s": r["output_throughput"],
                 "ttft": (r["ttft_ms"]["p50"], r["ttft_ms"]["p99"]), "tpot": (r["tpot_ms"]["p50"], r["tpot_ms"]["p99"]),
                 "itl": r["itl_ms"]["p50"]} for r in data["runs"]]
    if "output_throughput" in data:  # vllm bench serve
        return [{"run": name, "rate": data.get("request_rate"), "done": data.get("completed"),
                 "tok/s": data["output_throughput"], "ttft": (data["median_ttft_ms"], data["p99_ttft_ms"]),
                 "tpot": (data["median_tpot_ms"], data["p99_tpot_ms"]), "itl": data.get("median_itl_ms")}]
    return []


def main() -> None:
    found = [r for p in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))) for r in rows(p)]
    print("| run | rate | done | out tok/s | TTFT p50 (p99) ms | TPOT p50 (p99) ms | ITL p50 ms |")
    print("|---|---|---|---|---|---|---|")
    for r in found:
        cell = lambda pair: "-" if pair[0] is None else f"{pair[0]:.1f} ({pair[1]:.1f})"  # noqa: E731
        itl = "-" if r["itl"] is None else f"{r['itl']:.2f}"
        print(f"| {r['run']} | {r['rate']} | {r['done']} | {r['tok/s']:,.0f} | {cell(r['ttft'])} | "
              f"{cell(r['tpot'])} | {itl} |")


if __name__ == "__main__":
    main()
