"""The decode-sized all-reduce on two GPUs (``nanovllm/distributed/collectives.py``): with the symmetric buffer in
place, sizes on both sides of ``TWO_SHOT_FROM_BYTES`` (one-shot below, two-shot from it) sum what NCCL sums, run
eagerly and replayed from a CUDA graph, and a size past the buffer falls back to NCCL.

    python -m pytest -q -m gpu2 tests/gpu/test_symmetric_all_reduce.py
"""
import socket

import pytest
import torch

pytestmark = pytest.mark.gpu2

HIDDEN = 5120  # Qwen3-32B's: 64 rows bf16 are one-shot's, 256 rows two-shot's
ROWS = (1, 64, 100, 256, 300)  # 300 rows lie past the buffer (256 rows): NCCL


def _rank(rank: int, port: int, failures):
    import torch.distributed as dist
    from nanovllm import distributed
    from nanovllm.distributed import collectives
    torch.cuda.set_device(rank)
    distributed.init_process_group("nccl", rank, 2, init_method=f"tcp://127.0.0.1:{port}")
    try:
        device = torch.device("cuda", rank)
        assert distributed.use_symmetric_all_reduce(device, torch.bfloat16, 256 * HIDDEN)
        two_shot_from = collectives._one_shot[torch.bfloat16][2]
        assert 64 * HIDDEN < two_shot_from <= 256 * HIDDEN, two_shot_from
        gen = torch.Generator(device).manual_seed(rank)
        for rows in ROWS:
            x = torch.randn(rows, HIDDEN, device=device, dtype=torch.bfloat16, generator=gen) * (rank + 1)
            want = x.clone()
            dist.all_reduce(want)
            eager = distributed.all_reduce(x)
            graph = torch.cuda.CUDAGraph()
            distributed.all_reduce(x)  # warm-up outside the capture
            torch.cuda.synchronize()
            with torch.cuda.graph(graph):
                replayed = distributed.all_reduce(x)
            graph.replay()
            torch.cuda.synchronize()
            for how, got in (("eager", eager), ("graph", replayed)):
                if got.shape != want.shape or not torch.allclose(got.float(), want.float(), rtol=1e-2, atol=1e-2):
                    failures.append(f"rank {rank}, {rows} rows, {how}: largest difference "
                                    f"{(got.float() - want.float()).abs().max().item()}")
    finally:
        distributed.release_symmetric_all_reduce()
        dist.destroy_process_group()


def test_one_and_two_shot_sum_what_nccl_sums():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    failures = mp.get_context("spawn").Manager().list()
    mp.start_processes(_rank, args=(port, failures), nprocs=2, start_method="spawn")
    assert list(failures) == []
