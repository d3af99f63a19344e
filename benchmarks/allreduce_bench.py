"""The all-reduce of a tensor-parallel decode step, three ways, on 2+ CUDA GPUs of one host: NCCL
(``dist.all_reduce``) and PyTorch's symmetric-memory one-shot and two-shot kernels (peer loads over NVLink, no
multicast: ``TORCH_SYMM_MEM_DISABLE_MULTICAST=1`` and ``NCCL_NVLS_ENABLE=0`` stay set).

    python -m benchmarks.allreduce_bench [--gpus 2] [--hidden 5120] [--rows 1,16,64,128,256,1024,4096]

Each way runs ``--reps`` all-reduces of ``[rows, hidden]`` bf16 back to back inside one CUDA graph (as in a
captured decode step), after checking its sum against NCCL's; the graph is replayed and timed with CUDA events.
Prints µs per all-reduce and the bytes per µs, and writes ``$OUT/allreduce_bench.json``.
"""
import argparse
import json
import os
import socket

NO_MULTICAST = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def timed_graph(fn, reps: int, replays: int = 20) -> float:
    """µs per call of ``fn`` captured ``reps`` times in one CUDA graph."""
    import torch
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        g.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (replays * reps)


def rank_main(rank: int, size: int, port: int, args, out: list | None):
    import torch
    import torch.distributed as dist
    import torch.distributed._symmetric_memory as symm_mem
    os.environ.update(NO_MULTICAST)
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            device_id=torch.device("cuda", rank))
    group = dist.group.WORLD.group_name
    rows = [int(r) for r in args.rows.split(",")]
    most = max(rows) * args.hidden
    buf = symm_mem.empty(most, dtype=torch.bfloat16, device="cuda")
    symm_mem.rendezvous(buf, group)
    results = []
    for r in rows:
        x = torch.randn(r, args.hidden, device="cuda", dtype=torch.bfloat16) * (rank + 1)
        want = x.clone()
        dist.all_reduce(want)
        one = torch.ops.symm_mem.one_shot_all_reduce_copy(buf[:x.numel()].view(x.shape), x, "sum", group)
        two_in = buf[:x.numel()].view_as(x)
        two_in.copy_(x)
        two = torch.ops.symm_mem.two_shot_all_reduce_(two_in, "sum", group).clone()
        # Past two ranks the kernels add in other orders than NCCL, and a bf16 partial sum rounds at its own
        # magnitude: the tolerance scales with the largest sum (one rank's part missing is far outside it).
        atol = 2e-2 * float(want.abs().max())
        ok = {"one_shot": bool(torch.allclose(one.view_as(want), want, rtol=2e-2, atol=atol)),
              "two_shot": bool(torch.allclose(two, want, rtol=2e-2, atol=atol))}
        y = x.clone()

        def nccl():
            dist.all_reduce(y)

        def one_shot():
            torch.ops.symm_mem.one_shot_all_reduce_copy(buf[:x.numel()].view(x.shape), x, "sum", group)

        def two_shot():
            two_in.copy_(x)
            torch.ops.symm_mem.two_shot_all_reduce_(two_in, "sum", group)

        row = {"rows": r, "bytes": x.numel() * 2, "ok": ok}
        for name, fn in (("nccl", nccl), ("one_shot", one_shot), ("two_shot", two_shot)):
            dist.barrier()
            row[f"{name}_us"] = round(timed_graph(fn, args.reps), 2)
        results.append(row)
    if rank == 0:
        out.extend(results)
    dist.barrier()
    dist.destroy_process_group()


def main():
    import torch
    import torch.multiprocessing as mp
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=2)
    p.add_argument("--hidden", type=int, default=5120)
    p.add_argument("--rows", default="1,16,64,128,256,1024,4096")
    p.add_argument("--reps", type=int, default=64, help="all-reduces per captured graph")
    args = p.parse_args()
    if torch.cuda.device_count() < args.gpus:
        p.error(f"--gpus {args.gpus}: only {torch.cuda.device_count()} CUDA devices are visible")
    os.environ.update(NO_MULTICAST)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.get_context("spawn").Manager()
    out = manager.list()
    mp.start_processes(rank_main, args=(args.gpus, port, args, out), nprocs=args.gpus, start_method="spawn")
    rows = list(out)
    print(f"| rows x {args.hidden} | MB | NCCL µs | one-shot µs | two-shot µs | checks |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['rows']} | {r['bytes'] / 1e6:.2f} | {r['nccl_us']} | {r['one_shot_us']} | {r['two_shot_us']} | "
              f"{'ok' if all(r['ok'].values()) else r['ok']} |")
    os.makedirs(os.environ.get("OUT", "results"), exist_ok=True)
    with open(os.path.join(os.environ.get("OUT", "results"), "allreduce_bench.json"), "w") as f:
        json.dump({"gpus": args.gpus, "hidden": args.hidden, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
