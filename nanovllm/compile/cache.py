"""Persistent compile cache: a keyed, locked, checksummed on-disk store of PyTorch's compile artifacts.

An entry lives in ``<NANOVLLM_CACHE_DIR or ~/.cache/nanovllm>/compile/<key>/`` and holds
``artifacts.bin`` (``torch.compiler.save_cache_artifacts()``: Inductor FX-graph, AOTAutograd and Triton
artifacts) and ``manifest.json`` (the key fields, versions, creation time, size and the artifact's sha256).

The key hashes everything that changes the generated code: model config, dtype, buckets, compile policies,
static shapes (block size, table width, KV blocks), tensor-parallel size and rank, platform and device
architecture, torch/triton/nanovllm versions and the contents of every traced source file.  The source hash
matters: PyTorch's own FX-graph cache once served us a graph compiled for an older KV-cache layout.

Safety: a file lock serialises builders of one key (a second process waits, then loads what the first
saved); files are written to a temporary directory and renamed into place; an entry whose checksum does not
match is discarded with one warning and rebuilt, never loaded.  ``NANOVLLM_DISABLE_COMPILE_CACHE=1`` turns
the cache off.  Dynamo still traces on a warm start; what the cache skips is Inductor lowering and Triton
compilation.
"""
import contextlib
import fcntl
import hashlib
import json
import os
import platform as host_platform
import shutil
import tempfile
import time
from pathlib import Path

import torch

import nanovllm
from nanovllm.logger import logger
from nanovllm.paths import compile_cache_dir

_PACKAGE_DIR = Path(nanovllm.__file__).parent
_TRACED_SOURCES = ("models", "layers", "kernels", "compile", "platforms", "engine/step_inputs.py")


def source_hash(package_dir: Path = _PACKAGE_DIR) -> str:
    """sha256 over the traced source files (path and contents), in a stable order."""
    h = hashlib.sha256()
    for entry in _TRACED_SOURCES:
        path = package_dir / entry
        files = sorted(path.rglob("*.py")) if path.is_dir() else [path]
        for f in files:
            h.update(str(f.relative_to(package_dir)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def _device_arch(device: torch.device) -> str:
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} sm_{major}{minor}"
    return f"{host_platform.machine()} {host_platform.processor()}"


def key_fields(runner) -> dict:
    """Everything that changes the code the compiler generates for this runner."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    cfg = runner.config
    return {
        "model_config": cfg.hf_config, "dtype": str(runner.dtype), "buckets": list(cfg.graph_batch_sizes),
        "decode_compile": os.environ.get("NANOVLLM_DECODE_COMPILE", "shared"),
        "compile_prefill": runner.platform.compile_prefill, "kvcache_block_size": cfg.kvcache_block_size,
        "max_model_len": cfg.max_model_len, "max_num_seqs": cfg.max_num_seqs, "num_kv_blocks": runner.num_blocks,
        "tensor_parallel_size": cfg.tensor_parallel_size, "rank": 0, "platform": runner.platform.name,
        "device_arch": _device_arch(runner.device), "torch": torch.__version__, "triton": triton_version,
        "nanovllm": nanovllm.__version__, "source_sha256": source_hash(),
    }


def key_of(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cache_disabled() -> bool:
    return os.environ.get("NANOVLLM_DISABLE_COMPILE_CACHE", "0") not in ("", "0")


class CompileCache:
    def __init__(self, fields: dict, root: Path | None = None):
        self.fields = fields
        self.key = key_of(fields)
        self.root = Path(root) if root is not None else compile_cache_dir()
        self.entry = self.root / self.key
        self.hit = False

    def _load(self) -> bool:
        """Load a valid entry's artifacts; discard a corrupt one with a warning.  True on a hit."""
        manifest_path, artifacts_path = self.entry / "manifest.json", self.entry / "artifacts.bin"
        if not self.entry.exists():
            return False
        try:
            manifest = json.loads(manifest_path.read_text())
            data = artifacts_path.read_bytes()
            if hashlib.sha256(data).hexdigest() != manifest["sha256"] or len(data) != manifest["size"]:
                raise ValueError("checksum mismatch")
            torch.compiler.load_cache_artifacts(data)
            return True
        except Exception as e:  # any unreadable entry is rebuilt, never trusted
            logger.warning("compile cache entry %s is corrupt (%s); discarding and rebuilding", self.entry, e)
            shutil.rmtree(self.entry, ignore_errors=True)
            return False

    def _save(self) -> None:
        saved = torch.compiler.save_cache_artifacts()
        if saved is None:
            return
        data = saved[0]
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.key}.", dir=self.root))
        (tmp / "artifacts.bin").write_bytes(data)
        manifest = {"key": self.key, "fields": self.fields, "created": time.time(), "size": len(data),
                    "sha256": hashlib.sha256(data).hexdigest()}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, default=str))
        shutil.rmtree(self.entry, ignore_errors=True)
        os.rename(tmp, self.entry)

    @contextlib.contextmanager
    def activate(self):
        """Around compilation: load the entry if valid, else save what the body compiled (under a lock)."""
        if cache_disabled():
            yield self
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f".{self.key}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                self.hit = self._load()
                yield self
                if not self.hit:
                    self._save()
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)


def list_entries(root: Path | None = None) -> list[dict]:
    root = Path(root) if root is not None else compile_cache_dir()
    entries = []
    for manifest in sorted(root.glob("*/manifest.json")) if root.exists() else []:
        try:
            m = json.loads(manifest.read_text())
        except (OSError, ValueError):
            continue
        f = m.get("fields", {})
        entries.append({"key": m.get("key"), "architectures": f.get("model_config", {}).get("architectures"),
                        "dtype": f.get("dtype"), "buckets": f.get("buckets"), "platform": f.get("platform"),
                        "device_arch": f.get("device_arch"), "size_mb": round(m.get("size", 0) / 2**20, 2),
                        "age_hours": round((time.time() - m.get("created", time.time())) / 3600, 2),
                        "path": str(manifest.parent)})
    return entries


def clear_entries(root: Path | None = None) -> int:
    root = Path(root) if root is not None else compile_cache_dir()
    n = 0
    for entry in root.iterdir() if root.exists() else []:
        if entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
            n += 1
    return n
