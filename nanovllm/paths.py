"""Where nanovllm keeps files it makes: converted models and the compile cache.

The root is ``$NANOVLLM_CACHE_DIR`` if set, else ``~/.cache/nanovllm``.
"""
import os
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("NANOVLLM_CACHE_DIR")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "nanovllm"


def models_dir() -> Path:
    return cache_root() / "models"


def compile_cache_dir() -> Path:
    return cache_root() / "compile"
