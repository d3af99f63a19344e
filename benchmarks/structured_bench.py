"""Structured outputs offline: every request constrained by a JSON schema, nanovllm or vLLM, against the same
requests unconstrained.

    python -m benchmarks.structured_bench --engine nanovllm [--model DIR]
    env PYTHONPATH=/tmp/site python -m benchmarks.structured_bench --engine vllm --model DIR   # staged per peers/

Workload: ``--num-seqs`` (256) prompts drawn as bench.py draws them (``random.seed(0)``, 100 to ``--max-input-len``
random token ids), request ``i`` constrained by ``benchmarks.common.json_schema(i)`` (4 to 6 typed fields),
temperature 0.6, at most ``--max-tokens``.  Then the same prompts unconstrained, each with ``max_tokens`` = the
tokens its constrained run generated and ``ignore_eos``, so both runs generate the same tokens' worth of work, each
from an empty prefix cache (the second run would otherwise find the first one's prompts cached).  Each run is timed
after a warm-up of its own kind (the step's variants built); for nanovllm the JSON also holds each run's
engine stats (host, device-wait and grammar seconds, steps).  The model is bench.py's random
Qwen3-0.6B (or ``--model``, which needs tokenizer files); vLLM loads it with dummy weights and its xgrammar backend,
without free whitespace in JSON (``disable_any_whitespace``), as ours compiles it.
Prints one line per run and writes ``structured_<engine>.json`` under ``$OUT``.
"""
import argparse
import json
import time
from random import randint, seed

from benchmarks.common import MIN_LEN, default_model, json_schema, write_json


def prompts_of(num_seqs: int, max_input_len: int) -> list[list[int]]:
    seed(0)
    return [[randint(0, 10000) for _ in range(randint(MIN_LEN, max_input_len))] for _ in range(num_seqs)]


class _Nano:
    def __init__(self, model: str, bs: int):
        from nanovllm import LLM, SamplingParams
        from nanovllm.sampling_params import StructuredOutputsParams
        self.params, self.spec = SamplingParams, StructuredOutputsParams
        self.llm = LLM(model, max_num_seqs=bs, max_model_len=4096)

    def warm(self) -> None:
        for variant in ("forward", "sample"):
            self.llm.engine.runner.executor.build_variant_graphs(variant)

    def reset(self) -> None:
        """Zero the stats and forget every cached prefix: each timed run computes its prompts in full."""
        self.llm.engine.reset_stats()
        self.llm.engine.reset_prefix_cache()

    def stats(self) -> dict:
        """Where the run's seconds went: the engine's host and device-wait time, of the host time the grammars'
        (mask fills, matcher advances), and the steps."""
        s = self.llm.engine.stats
        return {k: round(s[k], 3) for k in ("host_time", "wait_time", "grammar_time", "prefill_steps", "decode_steps")}

    def sampling(self, schema: dict | None, max_tokens: int):
        spec = self.spec(json=schema) if schema is not None else None
        return self.params(temperature=0.6, max_tokens=max_tokens, ignore_eos=schema is None, structured_outputs=spec)

    def generate(self, prompts, params) -> list[list[int]]:
        return [o["token_ids"] for o in self.llm.generate(prompts, params, use_tqdm=False)]


class _Vllm:
    def __init__(self, model: str, bs: int):
        from vllm import LLM, SamplingParams
        from vllm.config import StructuredOutputsConfig
        from vllm.sampling_params import StructuredOutputsParams
        self.params, self.spec = SamplingParams, StructuredOutputsParams
        # compact JSON, as ours compiles it: a random model then cannot pad an object with blank space
        outputs = StructuredOutputsConfig(backend="xgrammar", disable_any_whitespace=True)
        self.llm = LLM(model, load_format="dummy", max_num_seqs=bs, max_model_len=4096, seed=0,
                       structured_outputs_config=outputs)

    def warm(self) -> None:
        pass

    def reset(self) -> None:
        self.llm.reset_prefix_cache()

    def stats(self) -> dict:
        return {}

    def sampling(self, schema: dict | None, max_tokens: int):
        spec = self.spec(json=schema) if schema is not None else None
        return self.params(temperature=0.6, max_tokens=max_tokens, ignore_eos=schema is None, structured_outputs=spec)

    def generate(self, prompts, params) -> list[list[int]]:
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["nanovllm", "vllm"], default="nanovllm")
    p.add_argument("--model", help="checkpoint dir with tokenizer files (default: bench.py's random Qwen3-0.6B)")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--max-input-len", type=int, default=1024)
    p.add_argument("--max-tokens", type=int, default=512)
    p.add_argument("--bs", type=int, default=256)
    args = p.parse_args(argv)
    start = time.perf_counter()
    engine = (_Nano if args.engine == "nanovllm" else _Vllm)(args.model or default_model(), args.bs)
    init_s = time.perf_counter() - start
    prompts = prompts_of(args.num_seqs, args.max_input_len)
    schemas = [json_schema(i) for i in range(args.num_seqs)]
    engine.generate(prompts[:8], [engine.sampling(s, 32) for s in schemas[:8]])  # warm-up, constrained
    engine.warm()
    result = {"engine": args.engine, "init_s": round(init_s, 1), "num_seqs": args.num_seqs}
    engine.reset()
    t = time.perf_counter()
    constrained = engine.generate(prompts, [engine.sampling(s, args.max_tokens) for s in schemas])
    seconds = time.perf_counter() - t
    constrained_stats = engine.stats()
    valid = sum(_parses(engine, ids) for ids in constrained)
    lengths = [max(1, len(ids)) for ids in constrained]
    engine.generate(prompts[:8], [engine.sampling(None, 32)] * 8)  # warm-up, plain
    engine.reset()
    t = time.perf_counter()
    plain = engine.generate(prompts, [engine.sampling(None, n) for n in lengths])
    plain_seconds = time.perf_counter() - t
    tokens = sum(len(ids) for ids in constrained)
    result.update(tokens=tokens, seconds=round(seconds, 2), tok_s=round(tokens / seconds, 1), parsed=valid,
                  plain_tokens=sum(len(ids) for ids in plain), plain_seconds=round(plain_seconds, 2),
                  plain_tok_s=round(sum(len(ids) for ids in plain) / plain_seconds, 1))
    result["constrained_over_plain"] = round(result["tok_s"] / result["plain_tok_s"], 3)
    result.update(constrained_stats=constrained_stats, plain_stats=engine.stats())
    print(f"{args.engine}: constrained {result['tok_s']:.0f} tok/s ({tokens} tokens, {seconds:.1f} s, {valid} of "
          f"{len(prompts)} parse as JSON); plain {result['plain_tok_s']:.0f} tok/s; ratio "
          f"{result['constrained_over_plain']}")
    print(json.dumps(result))
    write_json(f"structured_{args.engine}.json", result)
    return result


def _parses(engine, ids: list[int]) -> bool:
    tokenizer = engine.llm.get_tokenizer() if hasattr(engine.llm, "get_tokenizer") else engine.llm.tokenizer
    try:
        json.loads(tokenizer.decode(ids, skip_special_tokens=True))
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    main()
