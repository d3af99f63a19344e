"""One markdown table of every serving run in results directories of ``serve_gpu.sh``: our client's JSON
(``serve_bench.py``: a ``runs`` list, one per rate) and vLLM's ``vllm bench serve --save-result`` JSON, side by side;
``--plot`` also draws median TTFT, median TPOT and output tokens/s against the request rate, one line per server and
client (a run's name without its ``_light``/``_load``/... suffix, after its directory's name).

    python benchmarks/serve_table.py /tmp/nanovllm-results/serve [MORE_DIRS] [--plot latency.png]
"""
import argparse
import glob
import json
import os


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


def plot(found: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    lines: dict[str, list] = {}
    for r in found:
        lines.setdefault(r["line"], []).append(r)
    rates = sorted({_rate(r["rate"]) for r in found} - {float("inf")})
    x_of = {rate: i for i, rate in enumerate(rates)}  # saturating ("inf") drawn last
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for label, rs in sorted(lines.items()):
        rs = sorted(rs, key=lambda r: x_of.get(_rate(r["rate"]), len(rates)))
        xs = [x_of.get(_rate(r["rate"]), len(rates)) for r in rs]
        for ax, ys in zip(axes, ([r["ttft"][0] for r in rs], [r["tpot"][0] for r in rs], [r["tok/s"] for r in rs])):
            ax.plot(xs, ys, marker="o", label=label)
    for ax, title in zip(axes, ("median TTFT (ms)", "median TPOT (ms)", "output tokens/s")):
        ax.set_xticks(range(len(rates) + 1), [f"{r:g}/s" for r in rates] + ["saturating"])
        ax.set_title(title)
        ax.set_xlabel("request rate")
        ax.grid(alpha=0.3)
    axes[0].set_yscale("log")
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _rate(rate) -> float:
    return float("inf") if rate in ("inf", None) else float(rate)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+")
    p.add_argument("--plot", default=None, help="PNG path of the latency plot")
    args = p.parse_args()
    found = []
    for d in args.dirs:
        for path in sorted(glob.glob(os.path.join(d, "*.json"))):
            for r in rows(path):
                r["line"] = f"{os.path.basename(os.path.normpath(d))}: {r['run'].rsplit('_', 1)[0]}"
                found.append(r)
    if args.plot:
        plot(found, args.plot)
    print("| run | rate | done | out tok/s | TTFT p50 (p99) ms | TPOT p50 (p99) ms | ITL p50 ms |")
    print("|---|---|---|---|---|---|---|")
    for r in found:
        cell = lambda pair: "-" if pair[0] is None else f"{pair[0]:.1f} ({pair[1]:.1f})"  # noqa: E731
        itl = "-" if r["itl"] is None else f"{r['itl']:.2f}"
        name = f"{r['line'].split(':')[0]}: {r['run']}"
        print(f"| {name} | {r['rate']} | {r['done']} | {r['tok/s']:,.0f} | {cell(r['ttft'])} | {cell(r['tpot'])} | "
              f"{itl} |")


if __name__ == "__main__":
    main()
