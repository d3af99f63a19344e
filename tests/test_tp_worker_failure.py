"""A bug on a tensor-parallel worker reaches rank 0 as an error, not a hang (``nanovllm/parallel/launch.py``): on
two CPU ranks (gloo), an engine call that raises on rank 1 only (a ``ValueError`` or ``TypeError``, the kinds a
worker once swallowed) ends rank 1's process with exit code 1, and rank 0's ``generate`` raises ``RuntimeError``
naming rank 1, that code and rank 1's own error (type and message) within seconds; later calls raise at once, and
closing leaves no worker and this process a rank of one.  The generate runs in a thread, so that a regression fails
the test instead of hanging it."""
import threading
import time

import pytest

from conftest import build_checkpoint
from nanovllm import LLM, SamplingParams, distributed
from nanovllm.engine.engine import Engine
from test_tp_sizes import spawned_workers

ENGINE = dict(max_num_seqs=4, kvcache_block_size=16, num_kvcache_blocks=16, max_model_len=64, enforce_eager=True,
              device="cpu")
BOUND_S = 60  # a hang would last the group's timeout (NANOVLLM_TP_TIMEOUT_S, set above this)


class FailsOnRankOne(Engine):
    """``add_request`` raises ``TypeError`` on rank 1 for a prompt starting with 99; ``step`` raises
    ``ValueError`` on rank 1 once a prompt starting with 98 was added."""

    def add_request(self, prompt_token_ids, params, images=None, lora_request=None):
        if distributed.current().rank == 1 and prompt_token_ids[0] == 99:
            raise TypeError("injected on rank 1")
        self.fail_steps = getattr(self, "fail_steps", False) or prompt_token_ids[0] == 98
        return super().add_request(prompt_token_ids, params, images)

    def step(self):
        if distributed.current().rank == 1 and getattr(self, "fail_steps", False):
            raise ValueError("injected on rank 1")
        return super().step()


class FailsOnRankOneLLM(LLM):
    engine_class = FailsOnRankOne


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


def within_bound(call, hang: str) -> tuple[BaseException | None, float]:
    """(what ``call()`` raised, its seconds), run in a thread; fails the test with ``hang`` past ``BOUND_S``."""
    raised = []

    def run():
        try:
            call()
        except BaseException as e:  # noqa: BLE001 - handed to the test
            raised.append(e)

    start = time.monotonic()
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(BOUND_S)
    assert not thread.is_alive(), hang
    return (raised[0] if raised else None), time.monotonic() - start


def generate_with_bound(llm, prompt) -> tuple[BaseException | None, float]:
    """(what ``llm.generate([prompt])`` raised, its seconds); fails the test if it runs past ``BOUND_S``."""
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    return within_bound(lambda: llm.generate([prompt], params, use_tqdm=False),
                        f"rank 0 still waits {BOUND_S} s after rank 1 failed")


@pytest.mark.parametrize("prompt, error", [([99, 1, 2], "TypeError"), ([98, 1, 2], "ValueError")],
                         ids=["add_request", "step"])
def test_a_failure_on_rank_1_alone_raises_on_rank_0(model, monkeypatch, prompt, error):
    monkeypatch.setenv("NANOVLLM_TP_TIMEOUT_S", str(5 * BOUND_S))  # the worker inherits it
    with FailsOnRankOneLLM(model, tensor_parallel_size=2, **ENGINE) as llm:
        assert generate_with_bound(llm, [5, 6, 7])[0] is None  # in step so far
        raised, seconds = generate_with_bound(llm, prompt)
        assert isinstance(raised, RuntimeError), raised
        assert f"tensor-parallel worker(s) died: rank 1 (exit code 1): {error}: injected on rank 1" in str(raised)
        assert seconds < 30
        with pytest.raises(RuntimeError, match="rank 1 \\(exit code 1\\)"):
            llm.generate([[5, 6, 7]], use_tqdm=False)
    assert spawned_workers() == [] and distributed.current() == distributed.TensorParallel(0, 1)
