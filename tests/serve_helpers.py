"""A tiny checkpoint with a real (tiny) tokenizer for the text-level tests: stop strings, streaming, chat.

``build_text_checkpoint(dir)`` writes conftest's random tiny Qwen3 (vocab 384) plus a byte-level BPE tokenizer of
exactly 384 tokens trained on a few sentences, with ChatML special tokens and chat template (EOS ``<|im_end|>``).
With so few merges, most non-ASCII characters are split into one token per UTF-8 byte.

The weights are random except for a planted chain: the embedding of each token of ``CHAIN`` points along its own
hidden direction, far larger than anything the layers add, and the LM head row of the next token of the chain
reads that direction.  So wherever the last token is a chain token, the greedy next token is the following one,
and after the chat template's generation prompt (which ends with the chain's first token) the model answers
``CHAIN_TEXT`` (or the ``chain_text`` given, whose tokens must all differ) and then EOS, whatever came before.
``build_reply_checkpoint(dir, pieces)`` answers ``"".join(pieces)``, each piece a token of its own (any text).

``running_server`` starts ``python -m nanovllm.serve`` in a subprocess and yields its base URL once ``/health``
answers; ``post``, ``metrics`` (parsed by prometheus_client), ``wait_for_metrics`` and ``stream_text`` talk to it;
``descendants`` and ``alive`` follow its processes.
"""
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import build_checkpoint, free_port, running

ROOT = Path(__file__).resolve().parent.parent
CHAIN_TEXT = "Zoë: ☃𝄞 fine! Paris"
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
_CORPUS = ("The quick brown fox jumps over the lazy dog. A server streams tokens to every client that asks.\n"
           "Hello world, this is a tiny tokenizer for tests. Numbers like 12345 and 67890 appear here and there.\n"
           "Stop strings end a completion; logprobs report how likely each token was. Paris is in France.\n")


def build_tokenizer(out_dir, added: tuple[str, ...] = ()) -> "object":
    """The tiny tokenizer, with ``added`` as extra tokens that are not special (as Qwen3's ``<think>``)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384 - len(added), special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_CORPUS * 3], trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    assert tok.get_vocab_size() == 384
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                 clean_up_tokenization_spaces=False)
    hf.chat_template = CHAT_TEMPLATE
    hf.save_pretrained(out_dir)
    return AutoTokenizer.from_pretrained(out_dir)


def build_text_checkpoint(out_dir, chain_text: str = CHAIN_TEXT,
                          added: tuple[str, ...] = ()) -> tuple[str, list[int]]:
    """(checkpoint dir, the chain's token ids: the generation prompt's last token, ``chain_text``'s tokens, EOS);
    ``added``: extra tokens of the tokenizer (``build_tokenizer``)."""
    out_dir = Path(out_dir)
    tok = build_tokenizer(out_dir, added)
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    chain = [tok.encode(prompt)[-1]] + tok.encode(chain_text) + [eos]
    assert len(set(chain)) == len(chain) and tok.decode(chain[1:], skip_special_tokens=True) == chain_text
    build_checkpoint(out_dir, "qwen3", eos_token_id=eos, bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                     max_position_embeddings=4096)
    _plant_chain(out_dir, chain)
    return str(out_dir), chain


def build_reply_checkpoint(out_dir, pieces: list[str]) -> str:
    """A checkpoint whose chat reply is ``"".join(pieces)``: each piece is an added token of its own, so a reply may
    repeat characters (markup, JSON), as long as the pieces differ (at most 60 of them, none a token already, such
    as one character, nor in the prompt)."""
    out_dir = Path(out_dir)
    tok = build_tokenizer(out_dir, tuple(pieces))
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    chain = [tok.encode(prompt)[-1]] + [tok.convert_tokens_to_ids(p) for p in pieces] + [eos]
    assert len(set(chain)) == len(chain) and tok.decode(chain[1:], skip_special_tokens=True) == "".join(pieces)
    build_checkpoint(out_dir, "qwen3", eos_token_id=eos, bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"),
                     max_position_embeddings=4096)
    _plant_chain(out_dir, chain)
    return str(out_dir)


def _plant_chain(out_dir: Path, chain: list[int]) -> None:
    from safetensors.torch import load_file, save_file
    path = out_dir / "model.safetensors"
    weights = load_file(path)
    embed, head = weights["model.embed_tokens.weight"], weights["lm_head.weight"]
    hidden = embed.shape[1]
    assert len(chain) <= hidden
    for i, (token, following) in enumerate(zip(chain, chain[1:])):
        direction = torch.zeros(hidden)
        direction[i] = 1.0
        embed[token] = 50.0 * direction  # dwarfs the layers' additions: the final norm sees ~ this direction
        head[following] = 3.0 * direction  # logit ~ 3 * sqrt(hidden) = 24 where the chain is the last token
    save_file(weights, path, metadata={"format": "pt"})


class ServerURL(str):
    """The server's base URL, with its process id as ``pid``."""
    pid: int


@contextlib.contextmanager
def running_server(model_dir: str, log_dir: Path, *flags: str, **engine):
    """The server on a free port (engine options as keyword arguments), stopped on exit; yields its
    ``ServerURL``."""
    port = free_port()
    flags += tuple(f"--{k.replace('_', '-')}" + ("" if v is True else f"={v}") for k, v in engine.items())
    log = Path(log_dir) / "server.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "nanovllm.serve", model_dir, "--port", str(port), *flags],
                                stdout=out, stderr=subprocess.STDOUT, env=env)
    base = ServerURL(f"http://127.0.0.1:{port}")
    base.pid = proc.pid
    try:
        _wait_until_healthy(proc, base, log)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:  # a server that ignores SIGTERM must not outlive the tests
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def threaded_server(llm, max_waiting_seqs: int = 8, **serving_kw):
    """(a TestClient of the server's front on ``llm``'s engine, its ``Serving``), the engine stepped by an
    ``EngineCore`` in a thread; the core has ended when the block exits."""
    import multiprocessing
    import threading

    from fastapi.testclient import TestClient

    from nanovllm.entrypoints.app import build_app
    from nanovllm.entrypoints.engine_core import EngineCore
    from nanovllm.entrypoints.engine_loop import EngineLoop
    from nanovllm.entrypoints.serving import Serving
    core_inbox, to_core = multiprocessing.Pipe(duplex=False)
    from_core, core_outbox = multiprocessing.Pipe(duplex=False)
    core = threading.Thread(target=EngineCore(llm.engine).serve, args=(core_inbox, core_outbox), daemon=True)
    core.start()
    serving = Serving(EngineLoop(to_core, from_core, max_waiting_seqs=max_waiting_seqs), llm.prompts, "tiny",
                      **serving_kw)
    with TestClient(build_app(serving)) as client:
        yield client, serving
    core.join(timeout=30)
    assert not core.is_alive()


def _wait_until_healthy(proc, base: str, log: Path) -> None:
    import httpx
    deadline = time.monotonic() + 300
    while True:
        if proc.poll() is not None:
            pytest.fail(f"the server exited ({proc.returncode}):\n{log.read_text()}")
        try:
            if httpx.get(base + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"the server did not come up:\n{log.read_text()}")
        time.sleep(0.5)


def post(server: str, path: str, body, key: str | None):
    """POST a JSON body (a str is sent as is: broken JSON), with the API key if given."""
    import httpx
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    if isinstance(body, str):
        headers["Content-Type"] = "application/json"
    kwargs = {"content": body} if isinstance(body, str) else {"json": body}
    return httpx.post(server + path, headers=headers, timeout=60, **kwargs)


def metrics(server: str) -> dict:
    """Every sample of /metrics by name (``request_success_total{REASON}`` per finish reason), histogram buckets
    left out."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families
    out = {}
    for family in text_string_to_metric_families(httpx.get(server + "/metrics").text):
        for s in family.samples:
            if "le" in s.labels:
                continue
            reason = s.labels.get("finished_reason")
            out[f"{s.name}{{{reason}}}" if reason else s.name] = s.value
    return out


def wait_for_metrics(server: str, **expected) -> dict:
    """/metrics once every ``nanovllm:NAME`` equals its expected value (or after two minutes)."""
    deadline = time.monotonic() + 120
    while True:
        m = metrics(server)
        if all(m.get(f"nanovllm:{k}") == v for k, v in expected.items()) or time.monotonic() > deadline:
            return m
        time.sleep(0.2)


def stream_text(stream) -> tuple[list[str], dict]:
    """(the text pieces of a streamed completion or chat reply, its finish reason and usage)"""
    pieces, last = [], {}
    for chunk in stream:
        if chunk.usage is not None:
            last["usage"] = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.text if hasattr(choice, "text") else (choice.delta.content or ""))
            if choice.finish_reason:
                last["finish_reason"] = choice.finish_reason
    return pieces, last


def descendants(pid: int) -> list[int]:
    """The processes under ``pid``, at any depth (the engine process, its tensor-parallel ranks, their helpers)."""
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    found = [int(p) for p in out.split()]
    return found + [q for p in found for q in descendants(p)]


def alive(pids: list[int]) -> list[int]:
    """Those of ``pids`` still ``running`` (a zombie waiting to be reaped is not)."""
    return [pid for pid in pids if running(pid)]
