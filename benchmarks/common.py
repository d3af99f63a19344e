"""What the benchmark scripts share: where results go and which checkpoint they run by default."""
import json
import os


def out_dir() -> str:
    """``$OUT`` (the GPU tool's result folder) or ./results, created."""
    path = os.environ.get("OUT", "results")
    os.makedirs(path, exist_ok=True)
    return path


def write_json(name: str, obj) -> str:
    """Write ``obj`` as ``<out_dir>/<name>`` and return the path."""
    path = os.path.join(out_dir(), name)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)
    return path


def default_model() -> str:
    """bench.py's default: a random-weight bf16 Qwen3-0.6B, synthesized once and cached."""
    from nanovllm.tools.synthesize import cached_synthetic
    return str(cached_synthetic("qwen3-0.6b", dtype="bfloat16"))


def graph_us(calls, replays: int = 20) -> float:
    """Microseconds per call of ``calls`` (a list of thunks), captured in one CUDA graph and replayed.

    Each thunk runs once eagerly first, so compiles and allocations happen outside the capture."""
    import torch
    for c in calls:
        c()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for c in calls:
            c()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1000 / replays / len(calls)


def linear_reference(x, weight, silu_mul: bool):
    """What ``ops.linear`` (without bias) computes, in float32: the oracle of the matmul kernels."""
    import torch.nn.functional as F
    want = F.linear(x.float(), weight.float())
    if silu_mul:
        gate, up = want.chunk(2, dim=-1)
        want = F.silu(gate) * up
    return want
