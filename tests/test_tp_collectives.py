"""The tensor-parallel collectives on two CPU processes over gloo: their values, eager and inside a
``torch.compile(fullgraph=True)`` function with no graph break, and the group bookkeeping."""
import pytest
import torch
import torch.multiprocessing as mp

from conftest import free_port
from nanovllm import distributed

pytestmark = pytest.mark.slow


def _worker(rank: int, size: int, port: int, results):
    import os
    distributed.init_process_group("gloo", rank, size, init_method=f"tcp://127.0.0.1:{port}")
    assert os.environ["NCCL_NVLS_ENABLE"] == "0" and os.environ["TORCH_SYMM_MEM_DISABLE_MULTICAST"] == "1"
    x = torch.arange(6, dtype=torch.float32).view(2, 3) * (rank + 1)

    def step(t):
        return distributed.all_gather_last_dim(distributed.all_reduce(t * 2) + rank)

    explanation = torch._dynamo.explain(step)(x)
    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    results[rank] = {"eager": step(x), "compiled": compiled(x), "breaks": explanation.graph_break_count,
                     "tp": distributed.current()}
    torch.distributed.destroy_process_group()


def test_all_reduce_and_gather_over_two_ranks_eager_and_compiled():
    size = 2
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(size, free_port(), results), nprocs=size, join=True)
        results = dict(results)
    x = torch.arange(6, dtype=torch.float32).view(2, 3)
    reduced = 2 * x * (1 + 2)  # (t * 2) summed over ranks whose t = x * (rank + 1)
    want = torch.cat([reduced + 0, reduced + 1], dim=-1)
    for rank in range(size):
        r = results[rank]
        assert r["tp"] == distributed.TensorParallel(rank, size)
        assert torch.equal(r["eager"], want) and torch.equal(r["compiled"], want)
        assert r["breaks"] == 0


def test_a_group_of_one_leaves_tensors_alone():
    x = torch.randn(3, 4)
    assert distributed.current() == distributed.TensorParallel(0, 1)
    assert distributed.all_reduce(x) is x and distributed.all_gather_last_dim(x) is x


def test_a_rank_outside_the_group_is_refused():
    with pytest.raises(ValueError, match="rank 2 outside"):
        distributed.TensorParallel(2, 2)
