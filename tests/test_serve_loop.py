"""The server's front in process (FastAPI's TestClient): an engine that fails answers its requests with a 500,
then /health and new requests with a 503, and the process stays up; a request of ``n`` choices counts its prompt
once in the metrics.  Here the ``EngineCore`` runs in a thread of the test, over the same pipes the server's engine
process uses (``tests/test_serve_process.py`` covers that process)."""
import json
import multiprocessing
import threading

import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from nanovllm import LLM  # noqa: E402
from nanovllm.entrypoints.app import build_app  # noqa: E402
from nanovllm.entrypoints.engine_core import EngineCore  # noqa: E402
from nanovllm.entrypoints.engine_loop import EngineLoop  # noqa: E402
from nanovllm.entrypoints.serving import Serving  # noqa: E402
from nanovllm.prompts import Prompts  # noqa: E402
from serve_helpers import build_text_checkpoint  # noqa: E402


def prompts_of(path: str, max_model_len: int = 128) -> Prompts:
    with open(f"{path}/config.json") as f:
        hf_config = json.load(f)
    return Prompts(path, hf_config, hf_config["vocab_size"], max_model_len)


def test_an_engine_failure_fails_its_requests_and_the_health_check(tmp_path):
    path, _ = build_text_checkpoint(tmp_path)
    llm = LLM(path, enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=32, max_model_len=128)

    def broken_step():
        raise RuntimeError("device lost")

    llm.engine.step = broken_step
    core_inbox, to_core = multiprocessing.Pipe(duplex=False)
    from_core, core_outbox = multiprocessing.Pipe(duplex=False)
    core = threading.Thread(target=EngineCore(llm.engine).serve, args=(core_inbox, core_outbox), daemon=True)
    core.start()
    try:
        loop = EngineLoop(to_core, from_core, max_waiting_seqs=8)
        with TestClient(build_app(Serving(loop, llm.prompts, "tiny"))) as client:
            assert client.get("/health").status_code == 200
            r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
            assert r.status_code == 500 and "device lost" in r.json()["error"]["message"]
            assert client.get("/health").status_code == 503
            r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
            assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
            assert client.get("/version").status_code == 200
        core.join(timeout=30)
        assert not core.is_alive()  # the failed core ended; the server's front stayed up until closed
    finally:
        llm.close()


def test_a_server_needs_a_tokenizer(tmp_path):
    from conftest import build_checkpoint
    path = build_checkpoint(tmp_path, "qwen3")
    with pytest.raises(ValueError, match="needs a tokenizer"):
        Serving(EngineLoop(None, None, max_waiting_seqs=8), prompts_of(path), "tiny")


def test_the_server_command_names_a_missing_tokenizer_and_stops_its_engine(tmp_path):
    """``python -m nanovllm.serve`` on a checkpoint without a tokenizer: its engine process starts, then the
    command exits naming what is missing (the front's threads never started: shutting down must not wait on them)."""
    import subprocess
    import sys
    from conftest import build_checkpoint
    path = build_checkpoint(tmp_path, "qwen3")
    proc = subprocess.run([sys.executable, "-m", "nanovllm.serve", path, "--enforce-eager", "--port", "0"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1 and "nanovllm serve: the server needs a tokenizer" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_a_request_of_n_choices_counts_its_prompt_once():
    import asyncio

    from nanovllm.entrypoints.choices import run_choices
    from nanovllm.engine.outputs import SequenceOutput
    from nanovllm.entrypoints.engine_loop import RequestHandle
    from nanovllm.entrypoints.metrics import ServerMetrics
    from nanovllm.sampling_params import SamplingParams

    class Tokenizer:
        def decode(self, ids, **options):
            return "".join(chr(97 + t) for t in ids)

    async def run():
        handle = RequestHandle([1, 2, 3, 4, 5], [SamplingParams(max_tokens=2)] * 3)
        for i in range(3):
            handle.queue.put_nowait((i, SequenceOutput(0, [0], None, None)))
            handle.queue.put_nowait((i, SequenceOutput(0, [1], None, "length")))
        return [u async for u in run_choices(None, handle, Tokenizer(), metrics)]

    metrics = ServerMetrics("tiny", lambda: {"running": 0, "waiting": 0, "kv_cache_usage": 0.0})
    updates = asyncio.run(run())
    assert [u.finish_reason for u in updates].count("length") == 3
    assert metrics.prompt_tokens._value.get() == 5 and metrics.generation_tokens._value.get() == 6


def test_a_chat_stream_dropped_after_its_first_chunk_is_aborted(tmp_path):
    """The client leaves while the role chunk is being sent, before the reply reads any engine update: the
    request's sequences must still be aborted (here: an abort queued for the engine loop, which is not started)."""
    import asyncio

    from nanovllm.entrypoints.chat import create_chat_completion
    from nanovllm.entrypoints.protocol import ChatRequest

    path, _ = build_text_checkpoint(tmp_path)
    serving = Serving(EngineLoop(None, None, max_waiting_seqs=8), prompts_of(path), "tiny")
    req = ChatRequest(messages=[{"role": "user", "content": "hi"}], stream=True)

    class Request:
        async def receive(self):
            return {"type": "http.disconnect"}

    async def run():
        sent = []

        async def send(message):
            sent.append(message)
            await asyncio.sleep(0.05)  # a slow socket: the disconnect is noticed meanwhile

        response = await create_chat_completion(serving, req, Request())
        await response({"type": "http"}, Request().receive, send)
        return sent

    asyncio.run(run())
    assert [item[0] for item in serving.loop._outbox] == ["add", "abort"]  # queued for the engine, not yet sent


def test_deltas_queued_together_are_joined_per_choice():
    """A front that falls behind takes each choice's queued deltas as one update: same text, tokens and logprobs
    as one at a time, fewer chunks."""
    import asyncio

    from nanovllm.entrypoints.choices import run_choices
    from nanovllm.engine.outputs import SequenceOutput
    from nanovllm.entrypoints.engine_loop import RequestHandle
    from nanovllm.entrypoints.metrics import ServerMetrics
    from nanovllm.sampling_params import SamplingParams

    class Tokenizer:
        def decode(self, ids, **options):
            return "".join(chr(97 + t) for t in ids)

    def lp(t):
        return (-0.5 * t, [t], [-0.5 * t])

    async def run(one_at_a_time: bool):
        handle = RequestHandle([1, 2], [SamplingParams(max_tokens=4, logprobs=1)] * 2)
        events = [(0, SequenceOutput(0, [0], [lp(0)], None)), (1, SequenceOutput(0, [3], [lp(3)], None)),
                  (0, SequenceOutput(0, [1, 2], [lp(1), lp(2)], None)), (1, SequenceOutput(0, [4], [lp(4)], "stop")),
                  (0, SequenceOutput(0, [5], [lp(5)], "length"))]
        updates = []
        if one_at_a_time:
            gen = run_choices(None, handle, Tokenizer(), metrics)
            for event in events:
                handle.queue.put_nowait(event)
                updates.append(await anext(gen))
            return updates
        for event in events:
            handle.queue.put_nowait(event)
        return [u async for u in run_choices(None, handle, Tokenizer(), metrics)]

    metrics = ServerMetrics("tiny", lambda: {"running": 0, "waiting": 0, "kv_cache_usage": 0.0})
    alone, joined = asyncio.run(run(True)), asyncio.run(run(False))
    assert len(alone) == 5 and len(joined) == 2
    for index in (0, 1):
        mine = [u for u in alone if u.index == index]
        (together,) = [u for u in joined if u.index == index]
        assert "".join(u.text for u in mine) == together.text
        assert sum((u.token_ids for u in mine), []) == together.token_ids
        assert sum((u.logprobs for u in mine), []) == together.logprobs
        assert mine[-1].finish_reason == together.finish_reason
    assert [u.text for u in joined] == ["abcf", "d"] and [u.finish_reason for u in joined] == ["length", "stop"]
    assert metrics.generation_tokens._value.get() == 2 * 6


def test_text_prompts_that_arrive_together_are_tokenized_in_one_batch_off_the_loop():
    import asyncio
    import threading

    from nanovllm.entrypoints.tokenizing import BatchTokenizer

    class Tokenizer:
        def __init__(self):
            self.batches, self.threads = [], set()

        def encode(self, text):
            return [ord(c) for c in text]

        def __call__(self, texts):
            self.batches.append(list(texts))
            self.threads.add(threading.current_thread().name)
            if "bad" in texts:
                raise ValueError("cannot tokenize 'bad'")
            return {"input_ids": [self.encode(t) for t in texts]}

    async def run(texts):
        return await asyncio.gather(*(batcher.encode(t) for t in texts), return_exceptions=True)

    tok = Tokenizer()
    batcher = BatchTokenizer(tok)
    texts = [f"prompt {i}" for i in range(20)]
    assert asyncio.run(run(texts)) == [tok.encode(t) for t in texts]
    assert tok.batches == [texts]  # one call for all that arrived together
    assert tok.threads == {"nanovllm-tokenizer_0"} and threading.current_thread().name not in tok.threads
    results = asyncio.run(run(["ok", "bad"]))  # a failing batch fails each of its prompts, and the next one works
    assert all(isinstance(r, ValueError) and "'bad'" in str(r) for r in results)
    assert asyncio.run(run(["again"])) == [tok.encode("again")]
    assert asyncio.run(batcher.call(lambda: threading.current_thread().name)) == "nanovllm-tokenizer_0"
    batcher.close()
