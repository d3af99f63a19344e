"""Persistent compile cache: a keyed, locked, checksummed on-disk store of what PyTorch compiled.

An entry is ``<NANOVLLM_CACHE_DIR>/compile/<key>/``: ``artifacts.bin`` (PyTorch's mega-cache, hot-loaded),
``inductor/`` (the Inductor and Triton cache directories used while compiling it, which keep the compiled C++
kernels the mega-cache lacks), ``step.bin`` (the Dynamo-compiled step, where PyTorch's AOT precompile works:
``saved_step.py``), ``platform/`` (the platform compiler's own cache) and ``manifest.json`` (key fields, versions,
sizes and sha256 of every file; written last, it marks the entry complete).

The key (``key_fields``) hashes everything that changes the generated code, the traced source files included.
Inductor works in the entry's own directory while the entry is active (``TORCHINDUCTOR_CACHE_DIR`` and
``TRITON_CACHE_DIR`` set for that scope), so a graph cached under other sources is never found; its probe of the
CPU's vector instructions runs before, where every process finds it. An ``fcntl`` lock serialises processes on one
key; files are written to temporaries and renamed; an entry whose checksums do not match is discarded with a warning
and rebuilt, never loaded; a "hit" that still compiled is saved again. Each tensor-parallel rank has its own entry;
if any lacks its entry (or step), every rank rebuilds. ``NANOVLLM_DISABLE_COMPILE_CACHE=1`` turns the cache off.
"""
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

import nanovllm.distributed as distributed
from nanovllm.distributed import liveness
from nanovllm import envs
from nanovllm.logger import logger
from nanovllm.paths import compile_cache_dir
from nanovllm.version import __version__

AGREEMENT = "agreeing which compile-cache entries the ranks hold"  # the ranks' meeting before they agree

_PACKAGE_DIR = Path(__file__).resolve().parent.parent
_TRACED_SOURCES = ("models", "layers", "kernels", "distributed", "compile", "platforms", "step", "traced.py")
_UNCHECKED_SUFFIXES = (".lock", ".best_config")  # lock files, and autotune timings torch may rewrite


def source_hash(package_dir: Path = _PACKAGE_DIR) -> str:
    """sha256 over the traced source files (path and contents), in a stable order."""
    h = hashlib.sha256()
    for entry in _TRACED_SOURCES:
        path = package_dir / entry
        for f in sorted(path.rglob("*.py")) if path.is_dir() else [path]:
            h.update(str(f.relative_to(package_dir)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()


def key_fields(config, *, dtype, kv_dtype, num_kv_blocks: int, platform, num_window_blocks: int = 0) -> dict:
    """Everything that changes the code the compiler generates for an engine of ``config`` on ``platform``
    (``num_window_blocks``: a window pool's, where there is one)."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "model_config": config.hf_config, "dtype": str(dtype), "kv_cache_dtype": str(kv_dtype),
        "quantization": config.online_quantization,
        "buckets": list(config.graph_batch_sizes),
        "kvcache_block_size": config.kvcache_block_size, "max_model_len": config.max_model_len,
        "max_num_seqs": config.max_num_seqs, "num_kv_blocks": num_kv_blocks,
        "tensor_parallel_size": config.tensor_parallel_size,
        "rank": distributed.current().rank, "platform": platform.name,
        "device_arch": platform.arch(), "platform_versions": platform.versions(),
        "kernel_options": platform.options.as_dict(), "torch": torch.__version__,
        "triton": triton_version, "nanovllm": __version__, "source_sha256": source_hash(),
        **_inductor_settings(), **({"num_window_blocks": num_window_blocks} if num_window_blocks else {}),
        **({"lora": [config.max_loras, config.max_lora_rank]} if config.enable_lora else {}),
    }


def _inductor_settings() -> dict:
    """The Inductor settings nanovllm may change: PDL (``kernels/pdl.py``), eager rounding (``round_like_eager``)."""
    from torch._inductor import config
    return {"inductor_pdl": bool(getattr(config.triton, "enable_pdl", False)),
            "inductor_emulate_casts": bool(getattr(config, "emulate_precision_casts", False))}


def key_of(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:24]


def cache_disabled() -> bool:
    return envs.get("NANOVLLM_DISABLE_COMPILE_CACHE")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _file_hashes(directory: Path) -> dict[str, str]:
    return {str(f.relative_to(directory)): _sha256(f) for f in sorted(directory.rglob("*"))
            if f.is_file() and not f.name.endswith(_UNCHECKED_SUFFIXES)}


def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _clear_inductor_memory_caches() -> None:
    from torch._inductor import utils
    (getattr(utils, "clear_caches", None) or utils.clear_inductor_caches)()  # the older name


@contextlib.contextmanager
def _inductor_dir(directory: Path):
    """Point Inductor's (and Triton's) on-disk caches at ``directory`` for the body, like ``fresh_cache``; the
    two variables are restored afterwards (they are read by the compiler, not declared in ``nanovllm/envs.py``)."""
    saved = {name: os.environ.get(name) for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(directory)
    os.environ["TRITON_CACHE_DIR"] = str(directory / "triton")
    _clear_inductor_memory_caches()  # in-memory code caches may point into the previous directory
    try:
        yield
    finally:
        _clear_inductor_memory_caches()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextlib.contextmanager
def _locked(path: Path):
    with open(path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _probe_cpu_isa() -> None:
    """Inductor's probe of the CPU's vector instructions (a compile and a load of a file for each kind), run where it
    keeps its results across processes (the directory in effect before an entry's own).  Inductor remembers it for
    the process only, so run inside an entry, every process that compiles a new entry would compile the probes
    again."""
    from torch._inductor import cpu_vec_isa
    cpu_vec_isa.pick_vec_isa()


def _fxgraph_misses() -> int:
    from torch._dynamo.utils import counters
    return counters["inductor"]["fxgraph_cache_miss"]


class CompileCache:
    def __init__(self, fields: dict, root: Path | None = None):
        self.fields = fields
        self.key = key_of(fields)
        self.root = Path(root) if root is not None else compile_cache_dir()
        self.entry = self.root / self.key
        self.platform_dir = self.entry / "platform"  # the platform compiler's own cache (see the module doc)
        self.hit = False
        self.enabled = not cache_disabled()
        self.loaded = False  # a verified entry was loaded (it may still lack a saved step)
        self.saved_step: bytes | None = None  # the entry's verified step.bin
        self._artifacts: bytes | None = None
        self._step: bytes | None = None  # what step.bin will hold when the entry is (re)written
        self._step_changed = False

    def store_step(self, data: bytes) -> None:
        """Keep this serialized compiled step in the entry (written when the body of ``activate`` ends)."""
        self._step, self._step_changed = data, True

    def drop_step(self) -> None:
        """Remove the entry's saved step (it could not be used), so later starts do not try it again."""
        self._step, self._step_changed = None, True

    def _verified_artifacts(self) -> bytes | None:
        """The entry's artifacts if every checksum matches (``saved_step`` gets its step); a corrupt entry is
        discarded with a warning."""
        if not self.entry.exists():
            return None
        try:
            manifest = json.loads((self.entry / "manifest.json").read_text())
            if manifest["key"] != self.key:
                raise ValueError(f"manifest is for key {manifest['key']}")
            data = (self.entry / "artifacts.bin").read_bytes()
            if len(data) != manifest["size"] or hashlib.sha256(data).hexdigest() != manifest["sha256"]:
                raise ValueError("artifacts.bin checksum mismatch")
            listed = {"inductor": manifest["inductor_files"], "platform": manifest.get("platform_files", {})}
            for sub, files in listed.items():
                for name, digest in files.items():
                    if not (self.entry / sub / name).is_file() or _sha256(self.entry / sub / name) != digest:
                        raise ValueError(f"{sub}/{name} missing or checksum mismatch")
            if manifest.get("step") is not None:
                step, want = (self.entry / "step.bin").read_bytes(), manifest["step"]
                if (len(step), hashlib.sha256(step).hexdigest()) != (want["size"], want["sha256"]):
                    raise ValueError("step.bin checksum mismatch")
                self.saved_step = self._step = step
            return data
        except Exception as e:  # any unreadable entry is rebuilt, never trusted
            logger.warning("compile cache entry %s is corrupt or incomplete (%s); discarding and rebuilding",
                           self.entry, e)
            shutil.rmtree(self.entry, ignore_errors=True)
            return None

    def _save(self) -> None:
        saved = torch.compiler.save_cache_artifacts()
        data = saved[0] if saved is not None else self._artifacts  # a loaded entry keeps what it had
        platform_files = _file_hashes(self.platform_dir)
        if data is None and self._step is None and not platform_files:
            logger.info("compile cache: PyTorch recorded no artifacts; nothing saved")
            return
        data = data or b""
        _write_atomic(self.entry / "artifacts.bin", data)
        step = None
        if self._step is not None:
            _write_atomic(self.entry / "step.bin", self._step)
            step = {"size": len(self._step), "sha256": hashlib.sha256(self._step).hexdigest()}
        else:
            (self.entry / "step.bin").unlink(missing_ok=True)
        versions = {k: self.fields.get(k) for k in ("torch", "triton", "nanovllm")}
        manifest = {"key": self.key, "fields": self.fields, "versions": versions, "created": time.time(),
                    "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "step": step,
                    "inductor_files": _file_hashes(self.entry / "inductor"), "platform_files": platform_files}
        _write_atomic(self.entry / "manifest.json", json.dumps(manifest, indent=1, default=str).encode())

    @contextlib.contextmanager
    def activate(self):
        """Wrap compilation: load a valid entry, or save what the body compiled.  ``self.hit`` says which."""
        if not self.enabled:
            yield self
            return
        self.root.mkdir(parents=True, exist_ok=True)
        inductor = self.entry / "inductor"
        if self.fields.get("platform") == "cpu":
            _probe_cpu_isa()
        with _locked(self.root / f".{self.key}.lock"), _inductor_dir(inductor):
            data = self._verified_artifacts()
            # every rank of a tensor-parallel group loads, or rebuilds, alike: one rank compiling for minutes while
            # the others wait in its first collective would look like a peer that stopped answering.  The ranks meet
            # first: what came before (the CPU probe above: compiles) may take one rank longer than a collective waits
            held = 0 if data is None else 2 if self.saved_step is not None else 1
            liveness.meet(AGREEMENT)
            agreed = distributed.agree_min(held)
            if agreed < held:
                logger.info("compile cache: another tensor-parallel rank lacks its %s; rebuilding this rank's too",
                            "entry" if agreed == 0 else "saved step")
                if agreed == 0:
                    data = None
                self.saved_step = self._step = None
            # an entry whose build recorded no artifacts (everything is in step.bin) has nothing to hot-load
            loaded = data is not None and (data == b"" or torch.compiler.load_cache_artifacts(data) is not None)
            if data is not None and not loaded:
                logger.warning("compile cache entry %s could not be loaded by torch; rebuilding", self.entry)
            if not loaded:  # start from nothing: no leftovers of a crashed or corrupt build
                shutil.rmtree(self.entry, ignore_errors=True)
                self.saved_step = self._step = None
            self.loaded, self._artifacts = loaded, data if loaded else None
            inductor.mkdir(parents=True, exist_ok=True)
            self.platform_dir.mkdir(parents=True, exist_ok=True)
            platform_before = _file_hashes(self.platform_dir)
            from torch.compiler._cache import CacheArtifactManager
            misses = _fxgraph_misses()
            with CacheArtifactManager.with_fresh_cache():  # record only this entry's artifacts
                yield self
                complete = _fxgraph_misses() == misses and _file_hashes(self.platform_dir) == platform_before
                self.hit = loaded and complete and not self._step_changed
                if loaded and not complete and not self._step_changed:  # (a dropped step is traced anew)
                    logger.warning("compile cache entry %s was incomplete (the compiler compiled again); updating it",
                                   self.entry)
                if not self.hit:
                    self._save()


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


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
                        "step": f.get("step", "plain") + (f" bucket {f['bucket']}" if "bucket" in f else ""),
                        "device_arch": f.get("device_arch"), "num_kv_blocks": f.get("num_kv_blocks"),
                        "size_mb": round(_dir_bytes(manifest.parent) / 2**20, 2),
                        "age_hours": round((time.time() - m.get("created", time.time())) / 3600, 2),
                        "path": str(manifest.parent)})
    return entries


def clear_entries(root: Path | None = None) -> int:
    """Remove every entry (each under its lock, so a build in progress finishes first)."""
    root = Path(root) if root is not None else compile_cache_dir()
    n = 0
    for entry in sorted(root.iterdir()) if root.exists() else []:
        if entry.is_dir():
            with _locked(root / f".{entry.name}.lock"):
                shutil.rmtree(entry, ignore_errors=True)
            n += 1
    return n
