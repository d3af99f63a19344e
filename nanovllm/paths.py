"""Where nanovllm keeps files it makes: converted models and the compile cache.

The root is ``$NANOVLLM_CACHE_DIR`` if set, else ``~/.cache/nanovllm`` (``nanovllm/envs.py``).
"""
from pathlib import Path

from nanovllm import envs


def cache_root() -> Path:
    return envs.get("NANOVLLM_CACHE_DIR")


def models_dir() -> Path:
    return cache_root() / "models"


def compile_cache_dir() -> Path:
    return cache_root() / "compile"
