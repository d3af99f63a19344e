"""Serving benchmark: Poisson arrivals through the OpenAI API against a running server (ours or ``vllm serve``).

    python -m nanovllm.serve MODEL &                  # or: vllm serve MODEL
    python -m benchmarks.serve_bench --request-rate 4,16,inf --num-prompts 256 [--plot latency.png]
    python -m benchmarks.serve_bench --multi-turn 64,4 --system-len 2000 --turn-len 100 --reply-len 64

Prompts are token ids drawn like bench.py's (nano-vllm's) workload: ``random.seed(0)``, then per request
``randint(0, --max-token-id)`` ids, ``randint(--min-input-len, --max-input-len)`` of them, and ``max_tokens =
randint(--min-output-len, --max-output-len)``; ``ignore_eos``, so each request generates exactly ``max_tokens``,
except the ``--structured-share`` whose ``response_format`` is a JSON schema (``common.json_schema``), which end
with their object.
Each is sent to ``/v1/completions`` streamed (``stream_options.include_usage``) at times of a Poisson process of
``--request-rate`` requests/s (``inf``: all at once), at most ``--max-concurrency`` in flight.

Per rate it reports TTFT (first chunk with text), TPOT (``(latency - TTFT) / (tokens - 1)``, tokens from the usage
chunk), ITL (gaps between text chunks) and end-to-end latency at p50/p90/p99 in ms, request throughput and output
tokens/s, as a table and one JSON line, also written to ``$OUT/serve_bench.json`` (``--json`` names another
file).  ``--plot`` draws median and p99 TTFT and TPOT against the achieved request rate (needs matplotlib).
Each run also reports the server's prefix-cache hit rate (``prefix_cache``): the growth of its ``prefix_cache_hits``
over that of ``prefix_cache_queries`` (tokens), ``nanovllm:`` or ``vllm:`` counters scraped from ``/metrics`` before
and after the run ("unavailable" if it has neither).

``--multi-turn C,T`` is a chat workload instead: from ``random.Random(--seed)``, a system prompt of ``--system-len``
ids shared by all, then C conversations of T turns, each turn's prompt the whole history (the system prompt, the
earlier turns' user ids and reply ids, this turn's user ids: ``--turn-len`` user and ``--reply-len`` reply ids a
turn) asking for ``--reply-len`` tokens.  The replies in the history are *synthetic*, ids drawn like the rest and
not what the server generated (the completions API returns text): the history is the same for every server, and a
turn can hit the cache through the previous turn's prompt at most (a real chat could also hit its reply's blocks).
Conversations start at the Poisson times of ``--request-rate`` (one rate: a second run would hit the first's cache)
and send each turn once the previous one finished; the run adds ``ttft_ms_by_turn`` (turn 0 first).
"""
import argparse
import asyncio
import json
import random
import re
import sys
import time
from dataclasses import dataclass, field, replace

import httpx
import numpy as np

from benchmarks.common import json_schema, write_json


@dataclass
class Result:
    ok: bool = False
    error: str = ""
    ttft: float = 0.0
    latency: float = 0.0
    output_tokens: int = 0
    itl: list = field(default_factory=list)
    turn: int = 0


def workload(args) -> list[tuple[list[int], int, dict | None]]:
    """(prompt, max_tokens, JSON schema or None) per request; a ``--structured-share`` of them, spread evenly, get
    ``json_schema(i)``."""
    random.seed(0)
    share = args.structured_share
    return [([random.randint(0, args.max_token_id) for _ in range(random.randint(args.min_input_len,
                                                                                  args.max_input_len))],
             random.randint(args.min_output_len, args.max_output_len),
             json_schema(i) if int((i + 1) * share) > int(i * share) else None) for i in range(args.num_prompts)]


def conversations(args) -> list[list[tuple[list[int], int, None]]]:
    """``--multi-turn``'s requests, per conversation per turn: (the history so far, ``--reply-len``, no schema)."""
    rng = random.Random(args.seed)
    draw = lambda n: [rng.randint(0, args.max_token_id) for _ in range(n)]  # noqa: E731
    system, convs = draw(args.system_len), []
    for _ in range(args.multi_turn[0]):
        history, turns = list(system), []
        for _ in range(args.multi_turn[1]):
            history += draw(args.turn_len)
            turns.append((list(history), args.reply_len, None))
            history += draw(args.reply_len)
        convs.append(turns)
    return convs


def prefix_counters(args) -> tuple[str, float, float] | None:
    """(metric prefix, queried tokens, hit tokens): the server's prefix-cache counters summed over their labels (vLLM
    has one per engine), or None."""
    try:
        text = httpx.get(f"{args.base_url}/metrics", timeout=30).text
    except httpx.HTTPError:
        return None
    for prefix in ("nanovllm", "vllm"):
        found = re.findall(rf"^{prefix}:prefix_cache_(queries|hits)(?:_total)?(?:{{.*}})? (\S+)", text, re.M)
        if {kind for kind, _ in found} == {"queries", "hits"}:
            return prefix, *(sum(float(v) for k, v in found if k == kind) for kind in ("queries", "hits"))
    return None


def hit_rate(before, after) -> dict | str:
    """The growth of the counters from ``before`` to ``after`` (``prefix_counters``), and hits over queries."""
    if before is None or after is None:
        return "unavailable"
    q, h = after[1] - before[1], after[2] - before[2]
    return {"metrics": after[0], "queried_tokens": q, "hit_tokens": h, "hit_rate": h / q if q else None}


async def one_request(client: httpx.AsyncClient, args, model: str, prompt: list[int], max_tokens: int,
                      schema: dict | None) -> Result:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": args.temperature,
            "ignore_eos": schema is None, "stream": True, "stream_options": {"include_usage": True}}
    if schema is not None:  # ends when the object is complete
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "record", "schema": schema}}
    result = Result()
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", "/v1/completions", json=body) as response:
            if response.status_code != 200:
                result.error = f"{response.status_code}: {(await response.aread()).decode()[:200]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    result.error = json.dumps(chunk["error"])[:200]
                    return result
                if chunk.get("usage"):
                    result.output_tokens = chunk["usage"]["completion_tokens"]
                if chunk.get("choices") and chunk["choices"][0].get("text"):
                    now = time.perf_counter()
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
        result.latency = time.perf_counter() - start
        result.ok = result.output_tokens == max_tokens or schema is not None and result.output_tokens > 0
        if not result.ok:
            result.error = f"generated {result.output_tokens} tokens, asked for {max_tokens}"
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        result.error = repr(e)
    return result


async def run_rate(args, model: str, rate: float, convs) -> dict:
    """One run: conversations (lists of requests; one each but with ``--multi-turn``) starting at Poisson times of
    ``rate``, each sending a request once its previous one finished."""
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=args.max_concurrency or None, max_keepalive_connections=None)
    gate = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    rng = np.random.default_rng(args.seed)

    async def limited(client, prompt, max_tokens, schema):
        if gate is None:
            return await one_request(client, args, model, prompt, max_tokens, schema)
        async with gate:
            return await one_request(client, args, model, prompt, max_tokens, schema)

    async def conversation(client, requests):  # one request at a time
        return [replace(await limited(client, *request), turn=turn) for turn, request in enumerate(requests)]

    before = prefix_counters(args)
    async with httpx.AsyncClient(base_url=args.base_url, headers=headers, timeout=None, limits=limits) as client:
        tasks = []
        start = time.perf_counter()
        for requests in convs:
            tasks.append(asyncio.create_task(conversation(client, requests)))
            if rate != float("inf"):
                await asyncio.sleep(rng.exponential(1.0 / rate))
        results = [r for turns in await asyncio.gather(*tasks) for r in turns]
        duration = time.perf_counter() - start
    row = summarize(rate, results, duration)
    row["prefix_cache"] = hit_rate(before, prefix_counters(args))
    if args.multi_turn:
        row["ttft_ms_by_turn"] = [percentiles([r.ttft for r in results if r.ok and r.turn == t])
                                  for t in range(args.multi_turn[1])]
    return row


def percentiles(xs: list[float]) -> dict:
    """p50/p90/p99 of seconds, in ms (None without samples)."""
    return {f"p{q}": float(np.percentile(xs, q)) * 1e3 if len(xs) else None for q in (50, 90, 99)}


def summarize(rate: float, results: list[Result], duration: float) -> dict:
    good, ms = [r for r in results if r.ok], percentiles
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in good if r.output_tokens > 1]
    out_tokens = sum(r.output_tokens for r in good)
    return {"request_rate": rate if rate != float("inf") else "inf", "completed": len(good),
            "failed": len(results) - len(good),
            "errors": sorted({r.error for r in results if not r.ok})[:5], "duration_s": duration,
            "request_throughput": len(good) / duration, "output_throughput": out_tokens / duration,
            "ttft_ms": ms([r.ttft for r in good]), "tpot_ms": ms(tpot), "itl_ms": ms([x for r in good for x in r.itl]),
            "e2el_ms": ms([r.latency for r in good])}


def print_table(rows: list[dict]) -> None:
    cols = ["rate", "done", "fail", "req/s", "out tok/s"] + [f"{m} p{q}" for m in ("TTFT", "TPOT", "ITL", "E2EL")
                                                            for q in (50, 90, 99)]
    print(" | ".join(cols))
    for r in rows:
        cells = [str(r["request_rate"]), str(r["completed"]), str(r["failed"]), f"{r['request_throughput']:.2f}",
                 f"{r['output_throughput']:.1f}"]
        for m in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
            cells += ["-" if r[m][f"p{q}"] is None else f"{r[m][f'p{q}']:.1f}" for q in (50, 90, 99)]
        print(" | ".join(cells))
    for r in rows:
        for t, p in enumerate(r.get("ttft_ms_by_turn", ())):
            print(f"turn {t}: TTFT p50/p90/p99 " + " / ".join("-" if v is None else f"{v:.1f}" for v in p.values()))
        cache = r["prefix_cache"]
        print(f"rate {r['request_rate']}: prefix cache hit rate " + (cache if isinstance(cache, str) else
              f"{cache['hit_rate'] or 0:.3f} ({cache['hit_tokens']:.0f} of {cache['queried_tokens']:.0f} tokens, "
              f"{cache['metrics']}:prefix_cache_*)"))


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    x = [r["request_throughput"] for r in rows]
    for ax, metric in zip(axes, ("ttft_ms", "tpot_ms")):
        for q in ("p50", "p99"):
            ax.plot(x, [r[metric][q] for r in rows], marker="o", label=q)
        ax.set_xlabel("achieved request rate (req/s)")
        ax.set_ylabel(f"{metric[:4].upper()} (ms)")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def rates(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers or inf, got {text!r}") from None


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="model name to send (default: the first of /v1/models)")
    p.add_argument("--api-key")
    p.add_argument("--request-rate", type=rates, default=[float("inf")], help="req/s, comma-separated; inf")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--max-concurrency", type=int, default=0, help="requests in flight at most (0: no limit)")
    p.add_argument("--min-input-len", type=int, default=100)
    p.add_argument("--max-input-len", type=int, default=1024)
    p.add_argument("--min-output-len", type=int, default=100)
    p.add_argument("--max-output-len", type=int, default=1024)
    p.add_argument("--max-token-id", type=int, default=10000, help="prompt ids are drawn from [0, this]")
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--structured-share", type=float, default=0.0,
                   help="share of requests with a JSON schema (response_format json_schema; they end with it)")
    p.add_argument("--multi-turn", type=lambda t: tuple(map(int, t.split(","))), metavar="C,T",
                   help="C conversations of T turns (see above)")
    p.add_argument("--system-len", type=int, default=2000, help="--multi-turn: ids of the shared system prompt")
    p.add_argument("--turn-len", type=int, default=100, help="--multi-turn: ids of each user turn")
    p.add_argument("--reply-len", type=int, default=64, help="--multi-turn: tokens of each reply (max_tokens)")
    p.add_argument("--seed", type=int, default=0, help="seed of the arrival times (and --multi-turn's ids)")
    p.add_argument("--plot", help="save a PNG of latency against request rate")
    p.add_argument("--json", default="serve_bench.json", help="file name of the JSON result under $OUT")
    return p


def main() -> None:
    parser = make_parser()
    args = parser.parse_args()
    for name in ("num_prompts", "min_input_len", "min_output_len"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.min_input_len > args.max_input_len or args.min_output_len > args.max_output_len:
        parser.error("each --min-*-len must be <= its --max-*-len")
    if any(r <= 0 for r in args.request_rate):
        parser.error(f"--request-rate values must be > 0, got {args.request_rate}")
    if args.multi_turn and (len(args.multi_turn) != 2 or min(*args.multi_turn, args.turn_len, args.reply_len) < 1
                            or args.system_len < 0 or len(args.request_rate) != 1):
        parser.error("--multi-turn takes C,T >= 1, with --turn-len, --reply-len >= 1 and one --request-rate")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    model = args.model or httpx.get(f"{args.base_url}/v1/models", headers=headers).json()["data"][0]["id"]
    convs = conversations(args) if args.multi_turn else [[request] for request in workload(args)]
    rows = [asyncio.run(run_rate(args, model, rate, convs)) for rate in args.request_rate]
    print_table(rows)
    result = {"model": model, "base_url": args.base_url, "num_prompts": sum(map(len, convs)), "runs": rows}
    if args.multi_turn:
        result["multi_turn"] = dict(zip(("conversations", "turns"), args.multi_turn),
                                    **{k: getattr(args, k) for k in ("system_len", "turn_len", "reply_len", "seed")})
    print(json.dumps(result))
    write_json(args.json, result)
    if args.plot:
        plot(rows, args.plot)
    if any(r["failed"] for r in rows):
        sys.exit(f"failed requests: {[r['errors'] for r in rows if r['failed']]}")


if __name__ == "__main__":
    main()
