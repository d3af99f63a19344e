"""The server's engine loop in process (FastAPI's TestClient): an engine that fails answers its requests with a
500, then /health and new requests with a 503, and the process stays up."""
import pytest

pytest.importorskip("fastapi")

from fastapi.testclient import TestClient  # noqa: E402

from nanovllm import LLM  # noqa: E402
from nanovllm.entrypoints.app import build_app  # noqa: E402
from nanovllm.entrypoints.serving import Serving  # noqa: E402
from serve_helpers import build_text_checkpoint  # noqa: E402


def test_an_engine_failure_fails_its_requests_and_the_health_check(tmp_path):
    path, _ = build_text_checkpoint(tmp_path)
    llm = LLM(path, enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=32, max_model_len=128)

    def broken_step():
        raise RuntimeError("device lost")

    llm.engine.step = broken_step
    with TestClient(build_app(Serving(llm, "tiny", max_waiting_seqs=8))) as client:
        assert client.get("/health").status_code == 200
        r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 500 and "device lost" in r.json()["error"]["message"]
        assert client.get("/health").status_code == 503
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert client.get("/version").status_code == 200


def test_a_server_needs_a_tokenizer(tmp_path):
    from conftest import build_checkpoint
    llm = LLM(build_checkpoint(tmp_path, "qwen3"), enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=8,
              max_model_len=64)
    with pytest.raises(ValueError, match="needs a tokenizer"):
        Serving(llm, "tiny", max_waiting_seqs=8)
