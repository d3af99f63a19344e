"""``LLM.close()`` releases the engine: it closes the engine (``Engine.close`` where it exists), once however often
it is called, and ``with LLM(...) as llm:`` closes on leaving the block; at N = 2 it also ends the worker and
leaves the group, and the closed engine refuses further calls."""
import pytest

from conftest import build_checkpoint
from nanovllm import LLM, SamplingParams, distributed
from nanovllm.engine.engine import Engine
from test_tp_sizes import spawned_workers

ENGINE = dict(max_num_seqs=4, kvcache_block_size=16, num_kvcache_blocks=16, max_model_len=64, enforce_eager=True,
              device="cpu")
GREEDY = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


class ClosingEngine(Engine):
    def close(self):
        self.closes = getattr(self, "closes", 0) + 1
        getattr(super(), "close", lambda: None)()


class ClosingLLM(LLM):
    engine_class = ClosingEngine


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")


def test_close_closes_the_engine_once_and_the_with_block_closes(model):
    with ClosingLLM(model, **ENGINE) as llm:
        assert len(llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0]["token_ids"]) == 3
        assert getattr(llm.engine, "closes", 0) == 0
    assert llm.engine.closes == 1
    llm.close()
    del llm  # __del__ closes too, and must not close twice or raise
    explicit = ClosingLLM(model, **ENGINE)
    explicit.close()
    explicit.close()
    assert explicit.engine.closes == 1


def test_closing_two_ranks_ends_the_worker_and_closes_rank_0s_engine(model):
    with ClosingLLM(model, tensor_parallel_size=2, **ENGINE) as llm:
        assert len(llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)[0]["token_ids"]) == 3
        procs = llm.engine.peers.procs
    assert llm.engine._engine.closes == 1 and all(p.exitcode == 0 for p in procs)
    assert spawned_workers() == [] and distributed.current() == distributed.TensorParallel(0, 1)
    with pytest.raises(RuntimeError, match="the engine was closed"):
        llm.generate([[1, 2, 3]], GREEDY, use_tqdm=False)
    llm.close()
    assert llm.engine._engine.closes == 1


def test_an_llm_left_in_a_global_is_closed_at_exit_before_teardown(model):
    """A script that never closes its LLM: the engine closes at exit while every module still works (a device's
    synchronize, for one, is gone once the interpreter dismantles torch)."""
    import subprocess
    import sys
    script = f"""
import sys
from nanovllm import LLM
from nanovllm.engine.engine import Engine
close = Engine.close
def report(self):
    print("closed while finalizing:", sys.is_finalizing(), flush=True)
    close(self)
Engine.close = report
llm = LLM({model!r}, **{ENGINE!r})
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("closed while finalizing: False") == 1, out.stdout + out.stderr
