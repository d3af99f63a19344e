"""Speculative decoding, measured: each prompt set (``spec_prompts.py``) at each batch size and temperature, with
n-gram speculation off and on, in one engine each; prints a table and writes JSON.

    python -m benchmarks.spec_bench [--model DIR] [--batch 1,16] [--temperature 0,0.7] [--k 4] [--max-tokens 128]

A run sends ``--requests`` prompts of a set in batches of the batch size, one batch after another.  Per run:
output tokens per second per request (a request's tokens over the wall time of its batch, averaged),
and with speculation the acceptance rate (kept / proposed tokens) and the mean tokens a sequence gains per verify
step (1 + kept / drafts).  A run draws with seed 0 per request, so "same" says whether the speculative run gave
the plain run's tokens, as it must.  Without ``--model``: SmolLM2-135M-Instruct (``nanovllm.tools.default_model``).
"""
import argparse
import json
import time

from benchmarks.spec_prompts import copy_heavy, open_prompts
from nanovllm import LLM, SamplingParams


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def run(llm: LLM, prompts: list[list[int]], batch: int, temperature: float, max_tokens: int):
    """(token ids per request, seconds a request waited on average for its batch, the engine's speculation
    counters) of ``prompts`` in batches of ``batch``, one after another."""
    params = SamplingParams(temperature=temperature, seed=0, max_tokens=max_tokens)
    llm.engine.reset_stats()
    tokens, seconds = [], 0.0
    for lo in range(0, len(prompts), batch):
        start = time.perf_counter()
        tokens += [o["token_ids"] for o in llm.generate(prompts[lo:lo + batch], params, use_tqdm=False)]
        seconds += time.perf_counter() - start
    return tokens, seconds, {k: v for k, v in llm.engine.stats.items() if k.startswith("spec")}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    p.add_argument("--batch", default="1,16", help="comma-separated batch sizes")
    p.add_argument("--temperature", default="0,0.7", help="comma-separated temperatures")
    p.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    p.add_argument("--lookup-max", type=int, default=4, help="prompt_lookup_max")
    p.add_argument("--lookup-min", type=int, default=1, help="prompt_lookup_min")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--requests", type=int, default=16, help="requests per set (at least one batch), in batches")
    p.add_argument("--enforce-eager", action="store_true")
    p.add_argument("--json", default=None, help="write the rows here")
    args = p.parse_args()
    if args.model is None:
        from nanovllm.tools.default_model import default_model_path
        args.model = str(default_model_path())
    spec = {"method": "ngram", "num_speculative_tokens": args.k, "prompt_lookup_max": args.lookup_max,
            "prompt_lookup_min": args.lookup_min}
    runs = {}  # (set, batch, temperature, mode) -> run's outputs; one engine at a time holds the device
    for mode, extra in (("off", {}), ("ngram", {"speculative_config": spec})):
        llm = LLM(args.model, enforce_eager=args.enforce_eager, **extra)
        chat = llm.apply_chat_template
        sets = {"copy-heavy": [chat([{"role": "user", "content": t}]) for t in copy_heavy()],
                "open": [chat([{"role": "user", "content": t}]) for t in open_prompts()]}
        for name, prompts in sets.items():
            for batch in (int(b) for b in args.batch.split(",")):
                chosen = (prompts * (-(-batch // len(prompts))))[:max(batch, args.requests)]
                for temperature in _floats(args.temperature):
                    runs[name, batch, temperature, mode] = run(llm, chosen, batch, temperature, args.max_tokens)
        llm.close()
    rows = []
    for (name, batch, temperature, mode), (plain, plain_s, _) in runs.items():
        if mode != "off":
            continue
        ours, spec_s, stats = runs[name, batch, temperature, "ngram"]
        off = sum(len(t) for t in plain) / batch / plain_s
        on = sum(len(t) for t in ours) / batch / spec_s
        proposed, drafts = stats["spec_proposed_tokens"], stats["spec_drafts"]
        rows.append(dict(set=name, batch=batch, temperature=temperature, k=args.k, same=plain == ours,
                         off_tok_s=round(off, 1), ngram_tok_s=round(on, 1), speedup=round(on / off, 3),
                         acceptance=round(stats["spec_accepted_tokens"] / proposed, 3) if proposed else 0.0,
                         tokens_per_step=round(1 + stats["spec_accepted_tokens"] / drafts, 3) if drafts else 1.0,
                         accepted_by_position=stats["spec_accepted_by_position"],
                         proposed_by_position=stats["spec_proposed_by_position"]))
    print("| set | batch | temperature | off tok/s/req | n-gram tok/s/req | speed-up | acceptance | tokens/step | same |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['set']} | {r['batch']} | {r['temperature']} | {r['off_tok_s']} | {r['ngram_tok_s']} | "
              f"{r['speedup']}x | {r['acceptance']} | {r['tokens_per_step']} | {r['same']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
