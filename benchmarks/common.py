"""What the benchmark programs and bench.py share: where results go, the default checkpoint, nano-vllm's bench
workload, the engine arguments of one bench run, and the one set of GPU timers.

Timers (CUDA only; each synchronises before it returns):

* ``cuda_ms(fn)``: milliseconds per call of ``fn``, timed with CUDA events around ``reps`` back-to-back calls.
* ``graph_us(calls)``: microseconds per call of a list of thunks captured in one CUDA graph and replayed (no
  launch overhead; give each thunk its own buffers where the data would otherwise stay in L2).
* ``copy_bandwidth(device)``: bytes read + written per second by a large device-to-device copy, the practical
  memory ceiling every bandwidth-bound number here is compared with.

``decode_floor_seconds`` is the decode byte floor of docs/PERFORMANCE.md: each decode step reads the weights
once and every running sequence's KV, at copy bandwidth.  In a mixture of experts a step reads only the experts
its tokens were routed to: ``step_weight_bytes`` counts the expected share under uniform routing (random weights
route close to uniformly; a real checkpoint's skew touches fewer experts, so its floor is lower).
"""
import json
import os
from random import randint, seed

MIN_LEN = 100  # nano-vllm draws prompt and output lengths from randint(100, max)


def out_dir() -> str:
    """``$OUT`` (the GPU tool's result folder) or ./results, created."""
    path = os.environ.get("OUT", "results")
    os.makedirs(path, exist_ok=True)
    return path


def write_json(name: str, obj) -> str:
    """Write ``obj`` as ``<out_dir>/<name>`` (what JSON cannot hold as its ``str``) and return the path."""
    path = os.path.join(out_dir(), name)
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    return path


def default_model() -> str:
    """bench.py's default checkpoint: a random-weight bf16 Qwen3-0.6B, synthesized once and cached."""
    from nanovllm.tools.synthesize import cached_synthetic
    return str(cached_synthetic("qwen3-0.6b", dtype="bfloat16"))


def workload(num_seqs: int, max_input_len: int, max_output_len: int):
    """nano-vllm's bench workload, ``(prompts, params)``: ``random.seed(0)``; prompts ``[[randint(0, 10000) for _
    in range(randint(100, max_input_len))] ...]``, then ``max_tokens=randint(100, max_output_len)`` per sequence, in
    that order; temperature 0.6, ignore_eos."""
    from nanovllm import SamplingParams
    seed(0)
    prompts = [[randint(0, 10000) for _ in range(randint(MIN_LEN, max_input_len))] for _ in range(num_seqs)]
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=randint(MIN_LEN, max_output_len))
              for _ in range(num_seqs)]
    return prompts, params


_FIELDS = [("name", {"type": "string", "maxLength": 32}), ("age", {"type": "integer", "minimum": 0, "maximum": 150}),
           ("score", {"type": "number"}), ("active", {"type": "boolean"}),
           ("city", {"type": "string", "enum": ["Paris", "Rome", "Oslo", "Lima", "Pune"]}),
           ("email", {"type": "string", "maxLength": 40}), ("count", {"type": "integer"}),
           ("tag", {"type": "string", "maxLength": 16})]


def json_schema(i: int) -> dict:
    """Request ``i``'s JSON schema in the structured-output workloads: an object of 4 to 6 required typed fields
    (strings of bounded length, an enum, integers, a number, a boolean), 24 distinct schemas in turn."""
    fields = [_FIELDS[(i + j) % len(_FIELDS)] for j in range(4 + i % 3)]
    return {"type": "object", "properties": dict(fields), "required": [name for name, _ in fields],
            "additionalProperties": False}


def llm_kwargs(args, bs: int) -> dict:
    """``LLM(...)`` keyword arguments of one run: the engine flags of ``args`` (``nanovllm.cli``),
    ``max_num_seqs=bs`` and the given decode buckets up to ``bs`` (the defaults if none is left)."""
    from nanovllm.cli import engine_kwargs
    kwargs = dict(engine_kwargs(args), max_num_seqs=bs)
    if kwargs.get("graph_batch_sizes"):
        kwargs["graph_batch_sizes"] = [b for b in kwargs["graph_batch_sizes"] if b <= bs] or None
    return kwargs


def decode_floor_seconds(decode_steps: int, decode_kv_tokens: int, weight_bytes: int, kv_bytes_per_token: int,
                         bandwidth: float) -> float:
    """Seconds the decode steps need at least: weights once per step plus every KV token read, over
    ``bandwidth`` bytes per second."""
    if bandwidth <= 0:
        raise ValueError(f"bandwidth must be positive, got {bandwidth}")
    return (decode_steps * weight_bytes + decode_kv_tokens * kv_bytes_per_token) / bandwidth


def step_weight_bytes(batch: int, weight_bytes: int, expert_bytes: int = 0, expert_share: float = 0.0) -> float:
    """Expected weight bytes a decode step of ``batch`` sequences reads: every weight that is not a routed
    expert, plus each expert with the probability that at least one of the ``batch`` tokens picks it, where a
    token picks a given expert with probability ``expert_share`` (top_k / experts)."""
    if not 0.0 <= expert_share <= 1.0 or not 0 <= expert_bytes <= weight_bytes:
        raise ValueError(f"expert_share={expert_share} must lie in [0, 1] and expert_bytes={expert_bytes} in "
                         f"[0, weight_bytes={weight_bytes}]")
    return weight_bytes - expert_bytes + expert_bytes * (1.0 - (1.0 - expert_share) ** batch)


def cuda_ms(fn, reps: int = 10, warmup: int = 2) -> float:
    """Milliseconds per call of ``fn`` on the current CUDA stream (CUDA events around ``reps`` calls)."""
    import torch
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / reps


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
    return cuda_ms(graph.replay, reps=replays, warmup=3) * 1000 / len(calls)


def copy_bandwidth(device="cuda", nbytes: int = 1 << 30) -> float:
    """Bytes read + written per second by a device-to-device copy of ``nbytes`` (the practical ceiling)."""
    import torch
    a = torch.empty(nbytes, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    with torch.cuda.device(a.device):
        ms = cuda_ms(lambda: b.copy_(a), reps=10, warmup=2)
    return 2 * nbytes / (ms / 1000)

