"""The decode-sized all-reduce on two GPUs (``nanovllm/distributed/collectives.py``): with the symmetric buffer in
place, sizes on both sides of ``TWO_SHOT_FROM_BYTES`` (one-shot below, two-shot from it) sum what NCCL sums, run
eagerly and replayed from a CUDA graph, and a size past the buffer falls back to NCCL (eagerly).  The sum fused
with the residual add and RMSNorm (``fused_norm.py``) gives NCCL's sum plus the residual bit for bit and
``rms_norm`` of it, or ``ZeroCenteredRMSNorm``'s (within two units in the last place), eagerly and from graphs
replayed in turn (its buffer's halves alternate across calls); so do calls past its buffer, which sum with NCCL and
then add and norm in Triton.

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
_alive = []  # a rank's CUDA graphs, which stay until its process ends


def _rank(rank: int, port: int, failures, check):
    """One rank: joins the two-rank NCCL group, runs ``check`` (which appends what it finds wrong to ``failures``
    and returns its CUDA graphs, kept alive to the end), then ends without tearing NCCL down."""
    from nanovllm import distributed
    faulthandler.dump_traceback_later(90, exit=True)
    torch.cuda.set_device(rank)
    distributed.init_process_group("nccl", rank, 2, init_method=f"tcp://127.0.0.1:{port}")
    try:
        _alive.extend(check(rank, torch.device("cuda", rank), failures))
    except BaseException as e:
        failures.append(f"rank {rank}: {type(e).__name__}: {e}")
    torch.cuda.synchronize()
    os._exit(0)  # no NCCL teardown (see the docstring); the graphs go with the process


def _on_two_ranks(check):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    import torch.multiprocessing as mp
    port = free_port()
    failures = mp.get_context("spawn").Manager().list()
    mp.start_processes(_rank, args=(port, failures, check), nprocs=2, start_method="spawn")
    assert list(failures) == []


def _sums(rank: int, device: torch.device, failures) -> list:
    import torch.distributed as dist
    from nanovllm import distributed
    from nanovllm.distributed import collectives
    graphs = []
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
    return graphs


def test_one_and_two_shot_sum_what_nccl_sums():
    _on_two_ranks(_sums)


def _fused_sums(rank: int, device: torch.device, failures) -> list:
    import torch.distributed as dist
    from nanovllm import distributed
    from nanovllm.distributed import fused_norm
    from nanovllm.kernels.norm_rope import rms_norm
    from nanovllm.layers.norm import ZeroCenteredRMSNorm
    graphs = []
    assert distributed.use_symmetric_all_reduce(device, torch.bfloat16, 256 * HIDDEN, fuse_norm=True)
    gen = torch.Generator(device).manual_seed(rank)
    weight = torch.randn(HIDDEN, device=device, dtype=torch.bfloat16,
                         generator=torch.Generator(device).manual_seed(7))
    zero_centered_norm = ZeroCenteredRMSNorm(HIDDEN, 1e-6).to(device)
    zero_centered_norm.weight.data = weight * 0.1  # an offset from 1, as such checkpoints hold
    cases = []
    for rows in (1, 16, 64, 200, 256, 300, 1000):  # past 256 rows: NCCL's sum, then the add and norm kernel
        y = torch.randn(rows, HIDDEN, device=device, dtype=torch.bfloat16, generator=gen) * (rank + 1)
        residual = torch.randn(rows, HIDDEN + 64, device=device, dtype=torch.bfloat16,
                               generator=torch.Generator(device).manual_seed(rows))[:, :HIDDEN]
        assert fused_norm.usable(y, residual, weight)
        summed = y.clone()
        dist.all_reduce(summed)
        want_x = residual + summed
        cases.append((rows, False, weight, y, residual, want_x, rms_norm(want_x, weight, 1e-6)))
        cases.append((f"{rows}, zero-centred", True, zero_centered_norm.weight, y, residual, want_x,
                      zero_centered_norm(want_x)))
    results = []
    for rows, zc, w, y, residual, want_x, want_h in cases:
        results.append((rows, "eager", *fused_norm.all_reduce_add_rms_norm(y, residual, w, 1e-6, zc),
                        want_x, want_h))
    torch.cuda.synchronize()
    for rows, zc, w, y, residual, want_x, want_h in cases:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            x, h = fused_norm.all_reduce_add_rms_norm(y, residual, w, 1e-6, zc)
        graphs.append((graph, rows, x, h, want_x, want_h))
    for _ in range(3):  # each graph once a round: the halves a graph finds differ from round to round
        for graph, rows, x, h, want_x, want_h in graphs:
            x.zero_()
            graph.replay()
            torch.cuda.synchronize()
            results.append((rows, "graph", x.clone(), h.clone(), want_x, want_h))
    for rows, how, x, h, want_x, want_h in results:
        if not torch.equal(x, want_x):
            failures.append(f"rank {rank}, {rows} rows, {how}: x differs in "
                            f"{(x != want_x).sum().item()} places")
        off = (h.float() - want_h.float()).abs() > 2 ** -6 * want_h.float().abs()  # two units in the last place
        if off.any() or (h != want_h).float().mean() > 1e-3:  # the norm's rsqrt and sum order round apart
            failures.append(f"rank {rank}, {rows} rows, {how}: h off by over two ulps in {off.sum().item()}, "
                            f"differs in {(h != want_h).sum().item()} of {h.numel()}")
    return graphs


def test_fused_sum_add_and_norm_match_nccl_and_rms_norm():
    _on_two_ranks(_fused_sums)
