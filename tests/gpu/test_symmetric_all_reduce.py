"""The decode-sized all-reduce on two GPUs (``nanovllm/distributed/collectives.py``): with the symmetric buffer in
place, sizes on both sides of ``TWO_SHOT_FROM_BYTES`` (one-shot below, two-shot from it) sum what NCCL sums, run
eagerly and replayed from a CUDA graph, and a size past the buffer falls back to NCCL (eagerly).

Each rank ends its process without tearing NCCL down, as the engine's workers do: a group aborted while CUDA
graphs that captured its collectives are alive can wait for a long time.  A rank stuck for 90 s prints its stacks
and exits non-zero, which fails the test.

    python -m pytest -q -m gpu2 tests/gpu/test_symmetric_all_reduce.py
"""
import faulthandler
import os

import pytest
import torch

from conftest import free_port

pytestmark = pytest.mark.gpu2

HIDDEN = 5120  # Qwen3-32B's: up to 16 rows bf16 are one-shot's, from 64 rows two-shot's
ROWS = (1, 16, 64, 100, 256, 300)  # 300 rows lie past the buffer (256 rows): NCCL


def _rank(rank: int, port: int, failures):
    import torch.distributed as dist
    from nanovllm import distributed
    from nanovllm.distributed import collectives
    faulthandler.dump_traceback_later(90, exit=True)
    torch.cuda.set_device(rank)
    distributed.init_process_group("nccl", rank, 2, init_method=f"tcp://127.0.0.1:{port}")
    graphs = []
    try:
        device = torch.device("cuda", rank)
        assert distributed.use_symmetric_all_reduce(device, torch.bfloat16, 256 * HIDDEN)
        two_shot_from = collectives._symmetric[torch.bfloat16][2]
        assert 16 * HIDDEN < two_shot_from <= 64 * HIDDEN, two_shot_from
        gen = torch.Generator(device).manual_seed(rank)
        for rows in ROWS:
            x = torch.randn(rows, HIDDEN, device=device, dtype=torch.bfloat16, generator=gen) * (rank + 1)
            want = x.clone()
            dist.all_reduce(want)
            results = [("eager", distributed.all_reduce(x))]
            if rows <= 256:
                graph = torch.cuda.CUDAGraph()
                distributed.all_reduce(x)  # warm-up outside the capture
                torch.cuda.synchronize()
                with torch.cuda.graph(graph):
                    replayed = distributed.all_reduce(x)
                graph.replay()
                torch.cuda.synchronize()
                graphs.append(graph)
                results.append(("graph", replayed))
            for how, got in results:
                if got.shape != want.shape or not torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2):
                    failures.append(f"rank {rank}, {rows} rows, {how}: largest difference "
                                    f"{(got.float() - want.float()).abs().max().item()}")
    except BaseException as e:
        failures.append(f"rank {rank}: {type(e).__name__}: {e}")
    torch.cuda.synchronize()
    os._exit(0)  # no NCCL teardown (see the docstring); the graphs go with the process


def test_one_and_two_shot_sum_what_nccl_sums():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    import torch.multiprocessing as mp
    port = free_port()
    failures = mp.get_context("spawn").Manager().list()
    mp.start_processes(_rank, args=(port, failures), nprocs=2, start_method="spawn")
    assert list(failures) == []
