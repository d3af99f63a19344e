"""The server at ``--tensor-parallel-size 2`` on the CPU (gloo): the engine loop's step-level calls are mirrored
to the worker rank (``nanovllm/parallel/mirror.py``), so replies equal offline ``LLM``'s at N = 1, also after a
dropped stream and a stop string (aborts the worker must replay), and stopping the server ends its worker."""
import time

import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from nanovllm import LLM, SamplingParams  # noqa: E402
from serve_helpers import alive, build_text_checkpoint, descendants, running_server, wait_for_metrics  # noqa: E402

pytestmark = pytest.mark.slow

ENGINE = dict(enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=256, max_model_len=512, max_num_seqs=8)
PROMPTS = ["The quick brown fox", "Numbers like 12345", "Paris is"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_text_checkpoint(tmp_path_factory.mktemp("serve_tp"))[0]


@pytest.fixture(scope="module")
def offline(model):
    return LLM(model, **ENGINE)


def test_two_ranks_serve_offline_tokens_through_drops_and_stop_strings(model, offline, tmp_path):
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want = [o["text"] for o in offline.generate(PROMPTS, greedy, use_tqdm=False)]
    stop_want = offline.generate(PROMPTS[:1], SamplingParams(temperature=0, max_tokens=40, stop=[want[0][4:7]]),
                                 use_tqdm=False)[0]["text"]
    with running_server(model, tmp_path, "--tensor-parallel-size", "2", **ENGINE) as base:
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)

        def complete(prompt, **kw):
            r = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=12,
                                          extra_body={"ignore_eos": True}, **kw)
            return r.choices[0].text

        assert [complete(p) for p in PROMPTS] == want
        stream = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=400, stream=True,
                                           extra_body={"ignore_eos": True})
        for i, _ in enumerate(stream):
            if i == 3:
                break
        stream.close()  # rank 0 aborts it; the worker must replay the abort at the same step
        assert wait_for_metrics(base, num_requests_running=0)["nanovllm:num_requests_running"] == 0
        stopped = client.completions.create(model=model, prompt=PROMPTS[0], temperature=0, max_tokens=40,
                                            stop=[want[0][4:7]])
        assert stopped.choices[0].text == stop_want and stopped.choices[0].finish_reason == "stop"
        assert [complete(p) for p in PROMPTS] == want  # still in step after the abort and the stop string
        workers = descendants(base.pid)
        assert len(workers) >= 2  # the engine process and its rank 1 (and multiprocessing's resource trackers)
    deadline = time.monotonic() + 20
    while alive(workers) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert alive(workers) == []  # gone with the server
