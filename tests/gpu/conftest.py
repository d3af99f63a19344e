"""The GPU tests: correctness on a CUDA device (parity with transformers, graph == eager, the fused kernels
against their twins), run on the GPU machine with

    python -m pytest -q -m gpu tests/gpu

Every test here carries the ``gpu`` marker and is skipped without CUDA, so the CPU suite collects and skips them.
They need Triton compiled, not interpreted: with ``-m gpu`` on a CUDA machine ``TRITON_INTERPRET`` is set to 0
(tests/conftest.py defaults it to 1 for the CPU); a run that still interprets skips them, saying so.
"""
import os
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (tests/gpu); run with -m gpu")
    if torch.cuda.is_available() and config.getoption("markexpr", "") == "gpu":
        os.environ["TRITON_INTERPRET"] = "0"  # read when a kernel is decorated: before nanovllm's are imported


def skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "needs a CUDA device"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "Triton runs in its interpreter (TRITON_INTERPRET=1): run `python -m pytest -q -m gpu tests/gpu`"
    return None


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    reason = skip_reason()
    for item in items:
        if HERE in Path(item.fspath).parents:
            item.add_marker(pytest.mark.gpu)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
