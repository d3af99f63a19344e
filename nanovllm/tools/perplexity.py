"""``python -m nanovllm.tools.perplexity MODEL FILE [--window N] [--json] [engine flags]``: a text file's perplexity.

The file is tokenized whole (the tokenizer's special tokens are not added) and cut into consecutive windows of at
most ``--window`` tokens (default: the engine's ``max_model_len``, at most 2048).  Each window is one prompt of
``LLM.generate`` with ``prompt_logprobs=0`` (and one greedy completion token, not scored), so every token but a
window's first is scored by its logprob given the tokens before it in its window.  Printed: the scored token count,
the mean negative log-likelihood (nats per token) and the perplexity, exp of that mean; one line each, or one JSON
line with ``--json``.  Engine flags are ``LLM(...)``'s (``nanovllm/cli.py``); ``--enforce-eager`` defaults to on,
since a prefill that reports prompt logprobs runs eagerly and nothing is decoded.
"""
import argparse
import json
import math

from nanovllm import LLM, SamplingParams
from nanovllm.cli import add_engine_args, engine_kwargs

MAX_DEFAULT_WINDOW = 2048


def windows(token_ids: list[int], size: int) -> list[list[int]]:
    """``token_ids`` cut into consecutive windows of ``size`` tokens (the last one shorter)."""
    return [token_ids[i:i + size] for i in range(0, len(token_ids), size)]


def score(llm: LLM, token_ids: list[int], window: int) -> tuple[int, float]:
    """(scored tokens, their summed negative log-likelihood) of ``token_ids`` in windows of ``window`` tokens."""
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    prompts = windows(token_ids, window)
    count, nll = 0, 0.0
    for prompt, out in zip(prompts, llm.generate(prompts, params, use_tqdm=False)):
        for token, entry in zip(prompt[1:], out["prompt_logprobs"][1:]):
            nll -= entry[token]
            count += 1
    return count, nll


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="HF checkpoint directory (with a tokenizer)")
    parser.add_argument("file", help="the text file to score")
    parser.add_argument("--window", type=int, help=f"tokens per window, >= 2 (default: max_model_len, at most "
                                                   f"{MAX_DEFAULT_WINDOW})")
    parser.add_argument("--json", action="store_true", help="print one JSON line instead")
    add_engine_args(parser, defaults={"enforce_eager": True})
    args = parser.parse_args(argv)
    if args.window is not None and args.window < 2:
        parser.error(f"--window must be >= 2 (a window's first token is not scored), got {args.window}")
    with open(args.file, encoding="utf-8") as f:
        text = f.read()
    with LLM(args.model, **engine_kwargs(args)) as llm:
        if llm.tokenizer is None:
            parser.error(f"{args.model!r} has no tokenizer to read {args.file!r} with")
        limit = llm.config.max_model_len
        window = args.window if args.window is not None else min(limit, MAX_DEFAULT_WINDOW)
        if window > limit:
            parser.error(f"--window {window} is longer than max_model_len={limit}")
        token_ids = llm.tokenizer.encode(text, add_special_tokens=False)
        count, nll = score(llm, token_ids, window)
    if count == 0:
        parser.error(f"{args.file!r} gives {len(token_ids)} token(s): nothing to score with --window {window}")
    mean = nll / count
    result = {"tokens": count, "mean_nll": mean, "perplexity": math.exp(mean), "window": window}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"tokens: {count}\nmean_nll: {mean:.6f}\nperplexity: {result['perplexity']:.6f}")
    return result


if __name__ == "__main__":
    main()
