"""``Serving``: what the handlers share: the checkpoint's ``Prompts``, the engine loop, the metrics, the engine's
``pooler`` (embeddings; ``score_head``: ``scoring.make_head``'s, or None) and the steps from a
validated request to submitted sequences.  It needs a tokenizer (text out, stop strings, chat): none is refused.

* ``chat_template_kwargs``: the server's default template variables (``--default-chat-template-kwargs``), under a
  request's own; ``reasoning_parser``, ``tool_parser``: the parser classes of the flags (None: none, hermes).
* ``check_model``: a request naming another model gets a 404; ``lora_for``: the ``LoRARequest`` of a LoRA
  adapter's name (``loras``: ``lora_models.ServedLoras``, None without ``--enable-lora``), None for the base model.
* ``encode``: a prompt's token ids, checked (400 naming the prompt); text is tokenized off the event loop, with the
  other text prompts that arrive with it (``tokenizing.BatchTokenizer``).
* ``submit``: one engine request of ``n`` sequences per prompt, with its adapter if any (choice ``i`` with a seed
  gets ``seed + i``); a full waiting queue gets a 503 and the prompts already submitted are aborted.
* ``abort``: ends a request's sequences still running (a client that went away).
* ``updates``: the ``ChoiceUpdate``s of all of a request's prompts as they come, tagged with the prompt's index.
"""
import asyncio
import dataclasses
import functools
import json
import os
import time
import uuid

from nanovllm.entrypoints.choices import run_choices
from nanovllm.entrypoints.engine_loop import EngineDead, EngineLoop, Overloaded
from nanovllm.entrypoints.errors import APIError, bad_request
from nanovllm.entrypoints.lora_models import ServedLoras
from nanovllm.entrypoints.metrics import ServerMetrics
from nanovllm.entrypoints.protocol import check_model
from nanovllm.entrypoints.tokenizing import BatchTokenizer
from nanovllm.pooling_params import PoolerConfig, resolve_pooler
from nanovllm.prompts import Prompts
from nanovllm.scoring import make_head

GENERATION_DEFAULTS = ("temperature", "top_p", "top_k")  # generation_config.json fields requests default to


class Serving:
    def __init__(self, loop: EngineLoop, prompts: Prompts, served_model_name: str,
                 chat_template_kwargs: dict | None = None, reasoning_parser: type | None = None,
                 tool_parser: type | None = None, pooler: PoolerConfig | None = None, lora_modules: list | None = None):
        """``loop``: the engine (``EngineLoop``); ``prompts``: the checkpoint's tokenizer and prompt checks;
        ``pooler``: the engine's (default: the checkpoint's, ``resolve_pooler``); ``lora_modules``: None
        without ``--enable-lora``, else the adapters to load as the server starts (``lora_models.lora_modules``)."""
        self.pooler = pooler if pooler is not None else resolve_pooler(prompts.model)
        if prompts.tokenizer is None:
            raise ValueError(f"the server needs a tokenizer, and {prompts.model!r} has none (tokenizer.json)")
        self.loop, self.prompts, self.tokenizer = loop, prompts, prompts.tokenizer
        self.batch_tokenizer = BatchTokenizer(prompts.tokenizer)
        self.model_name = served_model_name
        self.loras = (ServedLoras(loop, served_model_name, lora_modules)
                      if lora_modules is not None else None)
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.reasoning_parser = reasoning_parser
        self.tool_parser = tool_parser
        self.max_model_len = prompts.max_model_len
        self.metrics = ServerMetrics(served_model_name, self.loop.stats)
        self.defaults = _generation_defaults(prompts.model)
        self.created = int(time.time())
        decoder = getattr(getattr(self.tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_decoder = _unicode_to_byte() if type(decoder).__name__ == "ByteLevel" else None

    def check_model(self, model: str | None) -> None:
        """The base model only (pooling runs no adapter)."""
        if self.loras is not None and model in self.loras.adapters:
            raise bad_request(f"`{model}` is a LoRA adapter: adapters serve completions and chat only", "model")
        check_model(model, self.model_name)

    def lora_for(self, model: str | None):
        return check_model(model, self.model_name, self.loras.adapters if self.loras is not None else None)

    async def encode(self, prompt, index: int) -> list[int]:
        if isinstance(prompt, str):
            prompt = await self.batch_tokenizer.encode(prompt)
        try:
            return self.prompts.encode_prompt(prompt, index)
        except (TypeError, ValueError) as e:
            raise bad_request(str(e), "prompt") from None

    def submit(self, prompts: list[tuple], n: int, lora=None) -> list:
        """Submit each (prompt ids, SamplingParams[, ImageInputs]) as ``n`` sequences, with ``lora`` (a
        ``LoRARequest``, or None for the base model); returns one handle per prompt."""
        if n * len(prompts) > self.loop.max_waiting_seqs:
            raise APIError(503, f"{len(prompts)} prompt(s) x n={n} sequences would pass --max-waiting-seqs="
                                f"{self.loop.max_waiting_seqs}", "n", "overloaded")
        handles = []
        try:
            for ids, p, *images in prompts:
                choices = [p if getattr(p, "seed", None) is None else dataclasses.replace(p, seed=p.seed + i)
                           for i in range(n)]
                handles.append(self.loop.submit(ids, choices, images[0] if images else None, lora))
        except (Overloaded, EngineDead) as e:
            self.abort(handles)
            raise APIError(503, str(e), None, "overloaded" if isinstance(e, Overloaded) else "engine_dead") from None
        return handles

    def score_head(self):
        """The scoring head (``scoring.make_head``: a sequence classifier's or the yes/no reranker's, built once), or
        None where the server scores by cosine."""
        cached = getattr(self, "_score_head", None)
        if cached is None or cached[0] is not self.pooler:  # built for this pooler
            self._score_head = (self.pooler, make_head(self.prompts.model, self.prompts.hf_config, self.tokenizer,
                                                       self.pooler))
        return self._score_head[1]

    def abort(self, handles) -> None:
        """End every sequence of ``handles`` still running (those finished are left as they are)."""
        for h in handles:
            self.loop.abort(h)

    async def updates(self, handles):
        """``(prompt index, ChoiceUpdate)`` of every choice of every handle, as they come."""
        gens = [run_choices(self.loop, h, self.tokenizer, self.metrics) for h in handles]
        if len(gens) == 1:
            async for update in gens[0]:
                yield 0, update
            return
        async for item in _merge(gens):
            yield item

    @functools.lru_cache(maxsize=1 << 16)  # noqa: B019 - one Serving per server, kept for its life
    def token_text(self, token_id: int) -> str:
        """A token's own text (a lone byte of a longer character decodes to U+FFFD)."""
        return self.tokenizer.decode([token_id])

    @functools.lru_cache(maxsize=1 << 16)  # noqa: B019
    def token_bytes(self, token_id: int) -> list[int]:
        """A token's UTF-8 bytes: its true bytes under a byte-level BPE (so that the bytes of the tokens of a
        split character join into it), else those of its text."""
        if self._byte_decoder is not None:
            piece = self.tokenizer.convert_ids_to_tokens(token_id)
            if piece is not None and all(c in self._byte_decoder for c in piece):
                return [self._byte_decoder[c] for c in piece]
        return list(self.token_text(token_id).encode())


def _unicode_to_byte() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): printable bytes stand for themselves, the others for the
    characters from U+0100 up, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[chr(b)] = b
        else:
            table[chr(256 + extra)] = b
            extra += 1
    return table


def request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def _generation_defaults(model_dir: str) -> dict:
    path = os.path.join(model_dir, "generation_config.json")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        config = json.load(f)
    if config.get("do_sample") is False:
        return {}
    return {k: config[k] for k in GENERATION_DEFAULTS if config.get(k) is not None}


async def _merge(gens):
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(k, gen):
        try:
            async for item in gen:
                queue.put_nowait((k, item, None))
            queue.put_nowait((k, done, None))
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - re-raised by the consumer
            queue.put_nowait((k, None, e))

    tasks = [asyncio.create_task(pump(k, g)) for k, g in enumerate(gens)]
    try:
        remaining = len(tasks)
        while remaining:
            k, item, error = await queue.get()
            if error is not None:
                raise error
            if item is done:
                remaining -= 1
                continue
            yield k, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for g in gens:
            await g.aclose()
