"""``LLM(path, tensor_parallel_size=2)`` on the CPU: it starts one worker process over gloo, its greedy float32
tokens equal transformers', a bad prompt raises on rank 0 and leaves both ranks usable, and closing it (or a worker
that died) leaves no process behind."""
import os

import pytest

from conftest import build_checkpoint, check_against_transformers, hf_greedy
from nanovllm import LLM, SamplingParams

ENGINE = dict(max_num_seqs=4, kvcache_block_size=16, num_kvcache_blocks=32, max_model_len=128, enforce_eager=True)
PROMPTS = [[5, 9, 13, 2, 7], [11, 3], [4, 4, 8, 15, 16, 23, 42, 1, 2]]
GREEDY = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def tp_llm(tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("qwen3"), "qwen3")
    llm = LLM(path, tensor_parallel_size=2, **ENGINE)
    yield path, llm
    llm.close()


def test_two_ranks_match_transformers_and_survive_a_bad_prompt(tp_llm):
    path, llm = tp_llm
    want = hf_greedy(path, PROMPTS, 6)
    assert [o["token_ids"] for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)] == want
    with pytest.raises(ValueError, match="outside the vocabulary"):
        llm.generate([[10_000]], GREEDY, use_tqdm=False)
    assert [o["token_ids"] for o in llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)] == want[:1]
    assert len(llm.engine.peers.procs) == 1 and llm.engine.peers.procs[0].is_alive()


def test_two_ranks_report_transformers_logprobs(tp_llm):
    path, llm = tp_llm
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=4)
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, params, use_tqdm=False)):
        check_against_transformers(path, prompt, out, 4)


def test_closing_stops_the_workers_and_leaves_the_group(tp_llm):
    from nanovllm import distributed
    procs = tp_llm[1].engine.peers.procs
    tp_llm[1].close()
    assert all(not p.is_alive() for p in procs)
    assert distributed.current() == distributed.TensorParallel(0, 1)


@pytest.mark.slow
def test_a_dead_worker_is_reported_on_the_next_call(tmp_path):
    import subprocess
    import sys
    import textwrap
    path = build_checkpoint(tmp_path, "llama")
    script = textwrap.dedent(f"""
        import os, signal, time
        from nanovllm import LLM, SamplingParams
        llm = LLM({path!r}, tensor_parallel_size=2, **{ENGINE!r})
        worker = llm.engine.peers.procs[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
        try:
            llm.generate([[1, 2, 3]], SamplingParams(max_tokens=2), use_tqdm=False)
        except RuntimeError as e:
            print("RAISED", e)
        print("CHILDREN", [p.pid for p in __import__("multiprocessing").active_children()])
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert "RAISED tensor-parallel worker(s) died: rank 1 (exit code -9)" in proc.stdout, proc.stderr[-2000:]
    assert "CHILDREN []" in proc.stdout

