"""Offline workloads, each run in nanovllm or vLLM (``--engine``) against its own baseline; JSON under ``$OUT``.

    python -m benchmarks.offline_bench structured --engine nanovllm [--model DIR]
    env PYTHONPATH=/tmp/site python -m benchmarks.offline_bench structured --engine vllm --model DIR  # peers/
    python -m benchmarks.offline_bench speculative --engine nanovllm [--model DIR] [--speculative-config JSON]

``structured``: 256 prompts drawn as bench.py draws them, each constrained by ``common.json_schema(i)``, against the
same prompts unconstrained (each its constrained run's length, ``ignore_eos``), from an empty prefix cache after a
warm-up of its kind; vLLM with dummy weights and xgrammar without free whitespace, as ours compiles JSON.
``embed`` / ``rerank``: 4,096 passages of ``--passage-len`` (256) random ids: embedded (LAST, normalised), or as
text scored against one query by a Qwen3-Reranker yes/no head (vLLM as its converted classifier, given the pairs
in the template ours applies); timed after a warm-up.
``speculative``: ``common.py``'s prompt sets (copy-heavy, open) in the chat template, at each ``--batch`` and
``--temperature``, speculation off then on (``--speculative-config``, vLLM's keys; default n-gram k = 4, lookup 1 to
4), each mode in an engine of its own: output tok/s per request, and for ours the acceptance, tokens gained per
verify step, the draft's seconds (``--draft``) and whether the tokens equal the run without speculation. The
model: SmolLM2-135M-Instruct unless ``--model``.  docs/BENCHMARKS.md says more.
"""
import argparse
import json
import time
from random import randint, seed

from benchmarks.common import MIN_LEN, OPEN, copy_heavy, default_model, json_schema, positive_ints, write_json


def make_engine(name: str, model: str, **kw):
    """An ``LLM`` of nanovllm or vLLM (dummy weights where ``kw`` says) and its ``SamplingParams`` class."""
    if name == "nanovllm":
        from nanovllm import LLM, SamplingParams
        return LLM(model, **kw), SamplingParams
    from vllm import LLM, SamplingParams
    return LLM(model, seed=0, **kw), SamplingParams


def generate(llm, prompts: list[list[int]], params) -> list[list[int]]:
    if hasattr(llm, "engine"):  # ours
        return [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


def structured(args) -> dict:
    seed(0)
    prompts = [[randint(0, 10000) for _ in range(randint(MIN_LEN, args.max_input_len))] for _ in range(args.num_seqs)]
    kw = dict(max_num_seqs=args.bs, max_model_len=4096)
    if args.engine == "vllm":  # compact JSON, as ours compiles it: a random model cannot pad an object with blanks
        from vllm.config import StructuredOutputsConfig
        kw.update(load_format="dummy", structured_outputs_config=StructuredOutputsConfig(
            backend="xgrammar", disable_any_whitespace=True))
    start = time.perf_counter()
    llm, params = make_engine(args.engine, args.model or default_model(), **kw)
    init_s = time.perf_counter() - start
    if args.engine == "vllm":
        from vllm.sampling_params import StructuredOutputsParams as Spec
    else:
        from nanovllm.sampling_params import StructuredOutputsParams as Spec

    def sampling(schema, max_tokens):
        spec = Spec(json=schema) if schema is not None else None
        return params(temperature=0.6, max_tokens=max_tokens, ignore_eos=schema is None, structured_outputs=spec)

    def timed(batch_params):
        generate(llm, prompts[:8], batch_params[:8])  # warm-up of the same kind
        if args.engine == "nanovllm":
            for variant in ("forward", "sample"):
                llm.engine.build_variant_graphs(variant)
            llm.engine.reset_stats()
            llm.engine.reset_prefix_cache()
        else:
            llm.reset_prefix_cache()
        t = time.perf_counter()
        out = generate(llm, prompts, batch_params)
        stats = {k: round(v, 3) for k, v in llm.engine.stats.items() if k in (
            "host_time", "wait_time", "grammar_time", "prefill_steps", "decode_steps")} if args.engine == "nanovllm" \
            else {}
        return out, time.perf_counter() - t, stats

    schemas = [json_schema(i) for i in range(args.num_seqs)]
    constrained, seconds, constrained_stats = timed([sampling(s, args.max_tokens) for s in schemas])
    tokenizer = llm.get_tokenizer() if hasattr(llm, "get_tokenizer") else llm.tokenizer
    valid = sum(_parses(tokenizer, ids) for ids in constrained)
    plain, plain_seconds, plain_stats = timed([sampling(None, max(1, len(ids))) for ids in constrained])
    tokens, plain_tokens = sum(map(len, constrained)), sum(map(len, plain))
    result = {"engine": args.engine, "init_s": round(init_s, 1), "num_seqs": args.num_seqs, "tokens": tokens,
              "seconds": round(seconds, 2), "tok_s": round(tokens / seconds, 1), "parsed": valid,
              "plain_tokens": plain_tokens, "plain_seconds": round(plain_seconds, 2),
              "plain_tok_s": round(plain_tokens / plain_seconds, 1),
              "constrained_stats": constrained_stats, "plain_stats": plain_stats}
    result["constrained_over_plain"] = round(result["tok_s"] / result["plain_tok_s"], 3)
    print(f"{args.engine}: constrained {result['tok_s']:.0f} tok/s ({tokens} tokens, {seconds:.1f} s, {valid} of "
          f"{len(prompts)} parse as JSON); plain {result['plain_tok_s']:.0f} tok/s; ratio "
          f"{result['constrained_over_plain']}")
    write_json(f"structured_{args.engine}.json", result)
    return result


def pooling(args) -> dict:
    seed(0)
    passages = [[randint(0, 10000) for _ in range(args.passage_len)] for _ in range(args.num_seqs)]
    rerank, model, kw = args.workload == "rerank", args.model or default_model(), dict(max_model_len=4096)
    if args.engine == "nanovllm":
        kw.update(pooler_config={"classifier_from_token": ["no", "yes"]} if rerank else None)
    else:
        kw.update(load_format="dummy", runner="pooling", hf_overrides=dict(
            architectures=["Qwen3ForSequenceClassification"], classifier_from_token=["no", "yes"],
            is_original_qwen3_reranker=True) if rerank else {})
    start = time.perf_counter()
    llm, _ = make_engine(args.engine, model, **kw)
    init_s, query = time.perf_counter() - start, "what does the passage say about the weather"
    docs = [(llm.get_tokenizer() if hasattr(llm, "get_tokenizer") else llm.tokenizer).decode(p) for p in passages]
    if args.engine == "nanovllm":
        run = (lambda n: llm.score(query, docs[:n], use_tqdm=False)) if rerank else \
            (lambda n: llm.embed(passages[:n], use_tqdm=False))
    else:
        from nanovllm.scoring import DEFAULT_INSTRUCTION, PREFIX, SUFFIX
        q = f"{PREFIX}<Instruct>: {DEFAULT_INSTRUCTION}\n<Query>: {query}\n"
        run = (lambda n: llm.score(q, [f"<Document>: {d}{SUFFIX}" for d in docs[:n]], use_tqdm=False)) if rerank \
            else (lambda n: llm.embed([{"prompt_token_ids": p} for p in passages[:n]], use_tqdm=False))
    run(64)  # warm-up
    t = time.perf_counter()
    outs = run(len(passages))
    seconds = time.perf_counter() - t
    tokens = sum(len(o.prompt_token_ids) for o in outs)
    result = dict(engine=args.engine, workload=args.workload, init_s=round(init_s, 1), num_seqs=len(outs),
                  tokens=tokens, seconds=round(seconds, 2), seqs_s=round(len(outs) / seconds, 1),
                  tok_s=round(tokens / seconds, 1))
    print(f"{args.engine} {args.workload}: {result['seqs_s']} passages/s, {result['tok_s']} tok/s, {seconds:.2f} s")
    write_json(f"{args.workload}_{args.engine}.json", result)
    return result


def _parses(tokenizer, ids: list[int]) -> bool:
    try:
        json.loads(tokenizer.decode(ids, skip_special_tokens=True))
        return True
    except ValueError:
        return False


def speculative(args) -> list[dict]:
    from transformers import AutoTokenizer
    if args.model is None:
        from nanovllm.tools.default_model import default_model_path
        args.model = str(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    sets = {name: [tokenizer.apply_chat_template([{"role": "user", "content": t}], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False) for t in texts]
            for name, texts in (("copy-heavy", copy_heavy()), ("open", OPEN))}
    spec = json.loads(args.speculative_config)
    if args.draft:
        spec = {"method": "draft_model", "model": default_model() if args.draft == "default" else args.draft,
                "num_speculative_tokens": spec["num_speculative_tokens"]}
    kw = dict(max_model_len=2048, max_num_seqs=max(positive_ints(args.batch, "--batch")))
    if args.load_format:
        kw["load_format"] = args.load_format
    rows, outputs, gaps = [], {}, {}
    modes = args.modes.split(",")
    for mode in modes:
        llm, params = make_engine(args.engine, args.model, **kw, **({"speculative_config": spec} if mode == "on"
                                                                   else {}))
        timer = _time_drafts(llm) if args.engine == "nanovllm" and mode == "on" else None
        if timer is not None and args.always_propose:
            llm.engine.spec_gate.adaptive = False
        generate(llm, sets["open"][:2], params(temperature=0, max_tokens=8))  # warm-up
        for name, prompts in sets.items():
            for batch in positive_ints(args.batch, "--batch"):
                chosen = (prompts * -(-max(batch, args.requests) // len(prompts)))[:max(batch, args.requests)]
                for temperature in map(float, args.temperature.split(",")):
                    p = params(temperature=temperature, seed=0, max_tokens=args.max_tokens)
                    row = dict(set=name, batch=batch, temperature=temperature, mode=mode, engine=args.engine)
                    tokens, row["seconds"] = _batches(llm, chosen, batch, p, timer)
                    outputs[name, batch, temperature, mode] = tokens
                    row["tok_s_per_request"] = round(sum(map(len, tokens)) / batch / row["seconds"], 1)
                    if args.engine == "nanovllm":
                        row.update(_spec_stats(llm.engine.stats, timer))
                        g = llm.engine.spec_gate  # its running averages at the end (``spec_gate.py``)
                        row["gate"] = {"gain": g.gain, "verify_ms": g.verify and round(1e3 * g.verify, 3),
                                       "plain_ms": g.plain and round(1e3 * g.plain, 3), "backoffs": dict(g.backoffs)}
                    rows.append(row)
        if args.engine == "nanovllm" and mode == "on" and "off" in modes:  # where greedy tokens differ, how close
            gaps.update(_greedy_gaps(llm, params, sets, outputs))
        if hasattr(llm, "close"):
            llm.close()
        del llm
    for row in rows:
        key = row["set"], row["batch"], row["temperature"]
        if row["mode"] == "on" and (*key, "off") in outputs:
            row["same"] = outputs[*key, "on"] == outputs[*key, "off"]
            off = next(r for r in rows if (r["set"], r["batch"], r["temperature"], r["mode"]) == (*key, "off"))
            row["speedup"] = round(row["tok_s_per_request"] / off["tok_s_per_request"], 3)
            if key in gaps:
                row["top2_gap_at_divergence"] = gaps[key]
        print(json.dumps(row))
    write_json(f"speculative_{args.engine}_{args.modes.replace(',', '_')}.json",
               {"model": args.model, "speculative_config": spec, "rows": rows})
    return rows


def _greedy_gaps(llm, params, sets: dict, outputs: dict) -> dict:
    """Per greedy cell whose tokens differ with speculation: at each request's first differing token, the gap
    between the top two logprobs there (nats, from a plain step over the common prefix): how near a tie it was."""
    found = {}
    for (name, batch, temperature, mode), on in outputs.items():
        off = outputs.get((name, batch, temperature, "off"))
        if mode != "on" or temperature != 0 or off is None or off == on:
            continue
        prompts = (sets[name] * -(-len(on) // len(sets[name])))[:len(on)]
        cells = []
        for prompt, a, b in zip(prompts, off, on):
            at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
            if at is not None:
                out = llm.generate([prompt + a[:at]], params(temperature=0, max_tokens=1, logprobs=2),
                                   use_tqdm=False)[0]["logprobs"][0]
                top = sorted(out.values(), reverse=True)
                cells.append(round(top[0] - top[1], 4))
        found[name, batch, temperature] = sorted(cells)
    return found


def _time_drafts(llm) -> dict | None:
    """Wrap the draft model's ``propose_all`` (if any) to add its seconds and calls to the returned dict."""
    drafter, timer = llm.engine.runner.drafter, {"seconds": 0.0, "calls": 0}
    if drafter is not None:
        inner = drafter.propose_all

        def propose_all(seqs, limits):
            t = time.perf_counter()
            out = inner(seqs, limits)  # waits for the drafts
            timer["seconds"] += time.perf_counter() - t
            timer["calls"] += 1
            return out
        drafter.propose_all = propose_all
    return timer


def _batches(llm, prompts, batch: int, params, timer) -> tuple[list[list[int]], float]:
    """Every prompt in batches of ``batch``, one after another: (token ids, seconds), from zeroed stats."""
    if hasattr(llm, "engine"):
        llm.engine.reset_stats()
        llm.engine.spec_gate.backoffs = dict.fromkeys(llm.engine.spec_gate.backoffs, 0)
    if timer is not None:
        timer.update(seconds=0.0, calls=0)
    tokens, seconds = [], 0.0
    for lo in range(0, len(prompts), batch):
        start = time.perf_counter()
        tokens += generate(llm, prompts[lo:lo + batch], params)
        seconds += time.perf_counter() - start
    return tokens, round(seconds, 3)


def _spec_stats(s: dict, timer) -> dict:
    proposed, drafts = s["spec_proposed_tokens"], s["spec_drafts"]
    return {"acceptance": round(s["spec_accepted_tokens"] / proposed, 3) if proposed else None,
            "tokens_per_verify": round(1 + s["spec_accepted_tokens"] / drafts, 3) if drafts else None,
            "verify_steps": s["spec_verify_steps"], "decode_steps": s["decode_steps"],
            "decode_seconds": round(s["decode_time"], 3), "accepted_by_position": s["spec_accepted_by_position"],
            **({"draft_seconds": round(timer["seconds"], 3), "draft_calls": timer["calls"]} if timer else {})}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workload", choices=["structured", "speculative", "embed", "rerank"])
    p.add_argument("--engine", choices=["nanovllm", "vllm"], default="nanovllm")
    p.add_argument("--model", help="checkpoint dir with tokenizer files")
    p.add_argument("--num-seqs", type=int, default=None, help="structured: requests (256); embed, rerank: "
                   "passages (4096)")
    p.add_argument("--passage-len", type=int, default=256, help="embed, rerank: tokens of a passage")
    p.add_argument("--max-input-len", type=int, default=1024, help="structured: longest prompt")
    p.add_argument("--max-tokens", type=int, default=None, help="most tokens a request generates "
                   "(default: structured 512, speculative 128)")
    p.add_argument("--bs", type=int, default=256, help="structured: max_num_seqs")
    p.add_argument("--batch", default="1,16", help="speculative: comma-separated batch sizes")
    p.add_argument("--temperature", default="0,0.7", help="speculative: comma-separated temperatures")
    p.add_argument("--requests", type=int, default=16, help="speculative: requests per set (at least a batch)")
    p.add_argument("--speculative-config", default='{"method": "ngram", "num_speculative_tokens": 4, '
                   '"prompt_lookup_min": 1, "prompt_lookup_max": 4}', help="speculative: vLLM's keys; the lookup "
                   "bounds are given, as vLLM's defaults (5, 5) differ from ours (1, 4)")
    p.add_argument("--draft", help="speculative: a draft model's directory (or 'default': bench.py's model) "
                   "instead of --speculative-config's method, at its k")
    p.add_argument("--modes", default="off,on", help="speculative: off, on or both, each in an engine of its own")
    p.add_argument("--load-format", default=None, help="speculative: e.g. dummy (the draft's weights too)")
    p.add_argument("--always-propose", action="store_true", help="speculative: no back-off (ours)")
    args = p.parse_args(argv)
    if args.max_tokens is None:
        args.max_tokens = 512 if args.workload == "structured" else 128
    if args.num_seqs is None:
        args.num_seqs = 256 if args.workload == "structured" else 4096
    if args.workload in ("embed", "rerank"):
        return pooling(args)
    return structured(args) if args.workload == "structured" else speculative(args)


if __name__ == "__main__":
    main()
