"""The interface every platform implements; defaults suit a device with no graph capture."""
import os
from contextlib import contextmanager

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Platform:
    name = "base"
    supports_graph_capture = False
    compile_backend = "inductor"
    compile_prefill = True  # compile prefill as one shape-dynamic graph (else it runs eagerly)

    def __init__(self, device: torch.device):
        self.device = device
        override = os.environ.get("NANOVLLM_COMPILE_PREFILL")  # "0"/"1": override the platform's choice
        if override is not None:
            if override not in ("0", "1"):
                raise ValueError(f"NANOVLLM_COMPILE_PREFILL must be 0 or 1, got {override!r}")
            self.compile_prefill = override == "1"

    def resolve_dtype(self, requested: str, checkpoint_dtype: str | None) -> torch.dtype:
        if requested != "auto":
            return _DTYPES[requested]
        return self.auto_dtype(checkpoint_dtype)

    def auto_dtype(self, checkpoint_dtype: str | None) -> torch.dtype:
        return torch.float32

    def synchronize(self) -> None:
        pass

    def available_kv_bytes(self, utilization: float) -> int | None:
        """Bytes the KV cache may take, or None when the platform cannot measure memory."""
        return None

    def reset_peak_memory(self) -> None:
        pass

    def compile(self, fn, dynamic: bool):
        """Lower ``fn`` with this platform's compiler; one static graph per input shape unless ``dynamic``."""
        return torch.compile(fn, backend=self.compile_backend, fullgraph=True, dynamic=dynamic)

    def graph_pool(self):
        return None

    @contextmanager
    def capture(self, pool):
        """Record the device work of the body for replay; a no-op where there is no graph capture."""
        yield None
