"""A tensor-parallel peer that dies on GPUs (NCCL, CUDA graphs, the one-shot all-reduce) never hangs rank 0: in a
script, a worker killed with SIGKILL mid-generate makes ``generate`` raise ``RuntimeError`` naming rank 1 within
seconds, and the script then exits by itself (within ``liveness.EXIT_BOUND_S`` of its end: a one-shot all-reduce
left waiting for the dead peer can hold the teardown), leaving the GPUs to a new two-rank engine.  The failed engine
runs in a process of its own: a collective that waits for a dead peer can hold its GPU until that process ends.

    python -m pytest -q -m gpu2 tests/gpu/test_tensor_parallel_failures.py
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import build_checkpoint

pytestmark = pytest.mark.gpu2

ROOT = Path(__file__).resolve().parents[2]
ENGINE = dict(device="cuda", tensor_parallel_size=2, kvcache_block_size=16, graph_batch_sizes=[8], max_num_seqs=8,
              max_model_len=512, num_kvcache_blocks=256)
SCRIPT = """
import faulthandler, os, signal, sys, threading, time
from nanovllm import LLM, SamplingParams

if __name__ == "__main__":
    faulthandler.dump_traceback_later(120, exit=True)  # stuck: every thread's stack on stderr, then exit
    llm = LLM(sys.argv[1], **{engine})
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    raised = []

    def run():
        try:
            while True:
                llm.generate([[5, 6, 7]] * 8, params, use_tqdm=False)
        except BaseException as e:
            raised.append(e)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    time.sleep(2.0)
    start = time.monotonic()
    os.kill(llm.engine.peers.procs[0].pid, signal.SIGKILL)
    thread.join(60)
    print("RAISED", type(raised[0]).__name__ if raised else None, f"{{time.monotonic() - start:.1f}}",
          str(raised[0]) if raised else "", flush=True)
"""


def test_a_worker_killed_mid_generate_raises_on_rank_0_and_the_gpus_come_back(tmp_path):
    from nanovllm import LLM, SamplingParams
    path = build_checkpoint(tmp_path / "qwen3", "qwen3")
    script = tmp_path / "kill_worker.py"
    script.write_text(textwrap.dedent(SCRIPT.format(engine=repr(ENGINE))))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    done = subprocess.run([sys.executable, str(script), path], env=env, capture_output=True, text=True, timeout=180)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RAISED")), "")
    assert line.startswith("RAISED RuntimeError"), done.stdout[-2000:] + done.stderr[-3000:]
    assert "rank 1 (exit code -9)" in line and float(line.split()[2]) < 20, line
    with LLM(path, **ENGINE) as again:  # the GPUs are free again
        out = again.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True),
                             use_tqdm=False)
    assert len(out[0]["token_ids"]) == 4
