"""A tensor-parallel peer that dies on a GPU (NCCL, CUDA graphs, the one-shot all-reduce) never hangs rank 0: a
worker killed with SIGKILL mid-generate makes ``generate`` raise ``RuntimeError`` naming rank 1 within seconds, its
GPU is freed, and a new two-rank engine then starts and generates in the same process.  Marked ``gpu2``:

    python -m pytest -q -m gpu2 tests/gpu/test_tensor_parallel_failures.py
"""
import os
import signal
import threading
import time

import pytest

from conftest import build_checkpoint

pytestmark = pytest.mark.gpu2

ENGINE = dict(device="cuda", tensor_parallel_size=2, kvcache_block_size=16, graph_batch_sizes=[8], max_num_seqs=8,
              max_model_len=512, num_kvcache_blocks=256)


def test_a_worker_killed_mid_generate_raises_on_rank_0_and_a_new_engine_starts(tmp_path):
    from nanovllm import LLM, SamplingParams
    path = build_checkpoint(tmp_path, "qwen3")
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    llm = LLM(path, **ENGINE)
    raised = []

    def run():
        try:
            while True:
                llm.generate([[5, 6, 7]] * 8, params, use_tqdm=False)
        except BaseException as e:  # noqa: BLE001 - handed to the test
            raised.append(e)

    try:
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        time.sleep(2.0)
        assert thread.is_alive(), raised
        start = time.monotonic()
        os.kill(llm.engine.peers.procs[0].pid, signal.SIGKILL)
        thread.join(60)
        assert not thread.is_alive(), "rank 0 still waits 60 s after its peer was killed"
        assert isinstance(raised[0], RuntimeError) and "rank 1 (exit code -9)" in str(raised[0]), raised
        assert time.monotonic() - start < 20
    finally:
        llm.close()
    with LLM(path, **ENGINE) as again:
        out = again.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                             use_tqdm=False)
    assert len(out[0]["token_ids"]) == 4
