"""The interface every platform implements; defaults suit a device with no graph capture."""
from contextlib import contextmanager

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Platform:
    name = "base"
    supports_graph_capture = False
    compile_backend = "inductor"

    def __init__(self, device: torch.device):
        self.device = device

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

    def compile(self, fn, dynamic: bool | None):
        """Lower ``fn`` with this platform's compiler (``dynamic=None``: only dims marked dynamic are symbolic)."""
        return torch.compile(fn, backend=self.compile_backend, fullgraph=True, dynamic=dynamic)

    def graph_pool(self):
        return None

    @contextmanager
    def capture(self, pool):
        """Record the device work of the body for replay; a no-op where there is no graph capture."""
        yield None
