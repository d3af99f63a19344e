"""How long the server's front takes to tokenize text prompts that arrive together: one by one on the event loop
(as before ``BatchTokenizer``) against ``BatchTokenizer`` (one batch call in its worker thread), and how long the
event loop is held meanwhile (its longest gap between ticks).

    python benchmarks/tokenize_prompts.py TOKENIZER_DIR [--num-prompts 256] [--prompt-len 562]

Prompts are random token ids decoded to text, as ``vllm bench serve``'s random dataset makes them.
"""
import argparse
import asyncio
import random
import time

from transformers import AutoTokenizer

from nanovllm.entrypoints.tokenizing import BatchTokenizer


async def timed(encode_all) -> tuple[float, float]:
    """(seconds to tokenize every prompt, longest gap between the event loop's ticks meanwhile)."""
    gaps, done = [0.0], asyncio.Event()

    async def ticker():
        last = time.perf_counter()
        while not done.is_set():
            await asyncio.sleep(0)
            now = time.perf_counter()
            gaps[0], last = max(gaps[0], now - last), now

    tick = asyncio.create_task(ticker())
    await asyncio.sleep(0)  # the ticker's first tick
    start = time.perf_counter()
    await encode_all()
    seconds = time.perf_counter() - start
    done.set()
    await tick
    return seconds, gaps[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("tokenizer")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=562)
    args = p.parse_args()
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    rng = random.Random(0)
    texts = [tok.decode([rng.randrange(tok.vocab_size) for _ in range(args.prompt_len)])
             for _ in range(args.num_prompts)]
    batcher = BatchTokenizer(tok)

    async def one_by_one():
        return [tok.encode(t) for t in texts]

    async def batched():
        return await asyncio.gather(*(batcher.encode(t) for t in texts))

    assert asyncio.run(one_by_one()) == asyncio.run(batched())
    for name, fn in (("one by one on the loop", one_by_one), ("BatchTokenizer", batched)):
        seconds, gap = asyncio.run(timed(fn))
        print(f"| {name} | {args.num_prompts} prompts | {seconds * 1e3:.1f} ms | longest loop gap {gap * 1e3:.1f} ms |")
    batcher.close()


if __name__ == "__main__":
    main()
