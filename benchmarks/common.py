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
