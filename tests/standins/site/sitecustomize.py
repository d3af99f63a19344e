"""Installs the NPU stand-ins (``tests/standins``) at interpreter start when ``NANOVLLM_TEST_STANDINS=npu``: the
tensor-parallel ranks a test spawns are fresh interpreters, without the test's stand-ins in ``sys.modules``, so the
test puts this directory first on their ``PYTHONPATH`` and sets the variable.  Only tests do; with the variable
unset (or another value) this does nothing."""
import os
import sys

if os.environ.get("NANOVLLM_TEST_STANDINS") == "npu":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    import transformers  # noqa: F401  (before torch_npu is importable: accelerate probes for it on import)
    from standins import install_npu
    install_npu()
