"""The CUDA C++ kernels of ``cuda_src/``: built on first use with the system's nvcc for this GPU, cached, loaded.

``load(name, device)`` returns the ``ctypes`` library built from ``cuda_src/<name>.cu`` for the device's compute
capability (``load_function``: its typed C function ``nvl_<name>``), or None, saying why once in the log:
``KernelOptions.cuda_kernels`` off (``NANOVLLM_CUDA_KERNELS=off``), no nvcc (``torch.utils.cpp_extension.CUDA_HOME``,
then ``PATH``), or a failed build.  Callers then keep their Triton path, which stays the fallback and the reference.
The library's C functions take raw pointers and the stream, so no torch headers are compiled and any torch build can
load it.  Builds are cached under
``$NANOVLLM_CACHE_DIR/cuda/<hash of source, headers, capability and nvcc>``; the first build of a kernel takes tens of
seconds and happens at engine start-up (``engine/runner_setup.py``; ``python -m nanovllm.precompile`` builds it too).  A
first load asked for inside a graph capture gets None and loads nothing.  ``CHUNK``, ``DTYPES`` and ``chunked`` are
the conventions the C functions share (the chunk of K they sum at a time, x's dtype codes).
"""
import ctypes
import hashlib
import os
import shutil
import subprocess
import threading
from pathlib import Path

import torch

from nanovllm.kernels.options import current_options
from nanovllm.kernels.triton_common import device_capability
from nanovllm.logger import logger
from nanovllm.paths import cache_root

SOURCES = Path(__file__).parent / "cuda_src"
_BUILD_SECONDS = 600  # one nvcc run's limit
# the conventions the C functions share: kChunk (cuda_src/w4a16_common.cuh), the columns a warp sums at a time, so K
# and groups are multiples of it; the code each takes for x's dtype
CHUNK = 128
DTYPES = {torch.bfloat16: 0, torch.float16: 1}


def chunked(k: int, group: int) -> bool:
    """Whether a C kernel sums K columns in ``group``-column scale groups: K whole chunks, and a group a multiple of
    a chunk or all of K."""
    return k % CHUNK == 0 and group > 0 and (group % CHUNK == 0 or group >= k)


_loaded: dict = {}
_lock = threading.Lock()


def nvcc_path() -> str | None:
    """The nvcc to build with: ``CUDA_HOME/bin/nvcc`` as torch finds it, else the first one on ``PATH``."""
    try:
        from torch.utils.cpp_extension import CUDA_HOME
    except (ImportError, OSError):
        CUDA_HOME = None
    if CUDA_HOME and (Path(CUDA_HOME) / "bin" / "nvcc").is_file():
        return str(Path(CUDA_HOME) / "bin" / "nvcc")
    return shutil.which("nvcc")


def library_path(name: str, arch: str, nvcc: str) -> Path:
    """Where the build of ``name`` for ``arch`` by ``nvcc`` is cached (a new source, shared header or nvcc is a new
    path)."""
    source = b"".join(p.read_bytes() for p in [SOURCES / f"{name}.cu", *sorted(SOURCES.glob("*.cuh"))])
    stat = Path(nvcc).stat()
    key = hashlib.sha256(source + f"{arch} {nvcc} {stat.st_size} {stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_root() / "cuda" / key / f"lib{name}.so"


def build(name: str, arch: str, nvcc: str) -> Path:
    """Compile ``cuda_src/<name>.cu`` into a shared library for ``arch`` (e.g. ``sm_90``), or raise naming why."""
    target = library_path(name, arch, nvcc)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")  # TP ranks build at once
    cmd = [nvcc, "-O3", "-std=c++17", f"-arch={arch}", "-shared", "-Xcompiler", "-fPIC", "-o", str(partial),
           str(SOURCES / f"{name}.cu")]
    logger.info("building the CUDA kernel %s for %s with %s (once; cached in %s)", name, arch, nvcc, target.parent)
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=_BUILD_SECONDS)
    if done.returncode != 0:
        raise RuntimeError(f"nvcc exited {done.returncode}: {done.stderr.strip()[-2000:]}")
    partial.replace(target)  # atomic: another process sees the whole library or none
    return target


_C_TYPES = {"p": ctypes.c_void_p, "i": ctypes.c_int, "l": ctypes.c_longlong}


def load_function(name: str, device: torch.device, signature: str):
    """The C function ``nvl_<name>`` of ``load(name, device)``, its parameters typed by ``signature`` (one letter
    each, in order: p a pointer, i an int, l a long long; it returns an int, a cudaError_t), or None."""
    lib = load(name, device)
    if lib is None:
        return None
    fn = getattr(lib, f"nvl_{name}")
    if fn.argtypes is None:
        fn.argtypes = [_C_TYPES[c] for c in signature]
        fn.restype = ctypes.c_int
    return fn


def load(name: str, device: torch.device) -> ctypes.CDLL | None:
    """The built library ``name`` for ``device``'s GPU, or None (the reason logged once per name)."""
    if device.type != "cuda" or not current_options().cuda_kernels:
        return None
    arch = "sm_%d%d" % device_capability(device)
    if (name, arch) not in _loaded and torch.cuda.is_current_stream_capturing():
        return None  # no build or module load inside a graph capture; the eager warm-up before it loads it
    with _lock:
        if (name, arch) not in _loaded:
            _loaded[(name, arch)] = _load(name, arch)
    return _loaded[(name, arch)]


def _load(name: str, arch: str) -> ctypes.CDLL | None:
    nvcc = nvcc_path()
    if nvcc is None:
        logger.info("CUDA kernel %s off: no nvcc (CUDA_HOME or PATH); its Triton path runs", name)
        return None
    try:
        return ctypes.CDLL(str(build(name, arch, nvcc)))
    except (OSError, RuntimeError, subprocess.TimeoutExpired) as e:
        logger.warning("CUDA kernel %s off: its build failed (%s); its Triton path runs", name, e)
        return None
