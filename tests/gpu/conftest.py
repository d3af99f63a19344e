"""The GPU tests: correctness on a CUDA device (parity with transformers, graph == eager, the fused kernels
against their twins), run on the GPU machine with

    python -m pytest -q -m gpu tests/gpu

Every test here carries the ``gpu`` marker and is skipped without CUDA, so the CPU suite collects and skips them.
They need Triton compiled, not interpreted: with ``-m gpu`` on a CUDA machine ``TRITON_INTERPRET`` is set to 0
(tests/conftest.py defaults it to 1 for the CPU); a run that still interprets skips them, saying so.
Tests marked ``gpu2`` (tensor parallelism: tests/gpu/test_tensor_parallel*.py, test_symmetric_all_reduce.py) also
need a second CUDA device and are skipped, saying so, where fewer than two are visible; ``-m gpu2`` sets
``TRITON_INTERPRET`` to 0 as ``-m gpu`` does.
"""
import os
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (tests/gpu); run with -m gpu")
    if torch.cuda.is_available() and config.getoption("markexpr", "") in ("gpu", "gpu2"):
        os.environ["TRITON_INTERPRET"] = "0"  # read when a kernel is decorated: before nanovllm's are imported


def skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "Triton runs in its interpreter (TRITON_INTERPRET=1): run `python -m pytest -q -m gpu tests/gpu`"
    return None


def skip_reason_gpu2() -> str | None:
    """Why a ``gpu2`` test cannot run here (fewer than two CUDA devices, or ``skip_reason``'s), or None."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        return f"needs two CUDA devices (tensor parallelism at two ranks), {count} visible"
    return skip_reason()


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    reason, reason_gpu2 = skip_reason(), skip_reason_gpu2()
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.gpu)
            why = reason_gpu2 if item.get_closest_marker("gpu2") is not None else reason
            if why:
                item.add_marker(pytest.mark.skip(reason=why))
