"""``BatchTokenizer``: the server's text prompts tokenized off the event loop, those that arrive together in one call.

Tokenizing a prompt of a few hundred tokens takes about a millisecond. 256 prompts that arrive at once, each
tokenized on the event loop in turn, hold up every stream and every later request for the sum. Here each prompt
waits on a future; one worker thread takes everything queued so far and tokenizes it as one batch
(``tokenizer(texts)``; a fast tokenizer's batch runs on several cores without the GIL). The event loop keeps
serving meanwhile. One thread, so the tokenizer is never used from two threads at once.

Contract: ``await encode(text)`` returns exactly ``tokenizer.encode(text)`` (special tokens added as ``encode``
adds them). If the batch call raises, every prompt of the batch raises that error. A caller cancelled while it
waits (a client that went away) gets nothing, and the others are unaffected. ``await call(fn, *args)`` runs any
other use of the tokenizer (a chat template) on the same thread and returns or raises what ``fn`` does.
"""
import asyncio
from concurrent.futures import ThreadPoolExecutor


class BatchTokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="nanovllm-tokenizer")
        self._pending: list[tuple[str, asyncio.Future]] = []
        self._task: asyncio.Task | None = None

    async def encode(self, text: str) -> list[int]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((text, future))
        if self._task is None:
            self._task = loop.create_task(self._drain())
        return await future

    async def call(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _drain(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    ids = await loop.run_in_executor(self._executor, self._encode_batch, [t for t, _ in batch])
                except Exception as e:  # noqa: BLE001 - handed to every caller of the batch
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(e)
                    continue
                for (_, future), one in zip(batch, ids):
                    if not future.done():
                        future.set_result(one)
        finally:
            self._task = None

    def _encode_batch(self, texts: list[str]) -> list[list[int]]:
        return list(self.tokenizer(texts)["input_ids"])

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
