"""Models by hub repo id (``nanovllm/hub.py``), against a fake hub on 127.0.0.1 (``tests/fake_hub.py``): no network.

huggingface_hub reads ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` when imported (conftest sets ``HF_HUB_OFFLINE=1``), so
in-process tests set its constants and subprocess tests set the environment.  Checked: a repo id (at a commit or a
branch) gives the same tokens as its directory, and ``config.model`` and the model the other ranks are started with
are the snapshot under ``download_dir``;
``HF_HUB_OFFLINE=1`` loads the cached snapshot with the hub gone; a missing repo, revision, config.json or
safetensors raises an error naming them; ``*.bin``, ``*.pt``, ``*.gguf`` are never downloaded; ``nanovllm serve
org/name --revision R --download-dir D`` lists ``org/name`` in /v1/models.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import build_checkpoint
from fake_hub import FakeHub
from serve_helpers import build_tokenizer

ROOT = Path(__file__).resolve().parent.parent
OPTIONS = dict(device="cpu", enforce_eager=True, max_num_seqs=2, max_model_len=64, kvcache_block_size=16,
               num_kvcache_blocks=16)
PROMPTS = [[5, 6, 7, 8, 9], [11, 12]]
NOT_FETCHED = {"pytorch_model.bin": b"pickled weights", "model.gguf": b"GGUF\x03", "consolidated.pt": b"pt",
               "original/model.bin": b"bin", "README.md": b"# tiny"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tiny")
    build_tokenizer(out)
    build_checkpoint(out, "qwen3")
    return out


@pytest.fixture(scope="module")
def files(checkpoint) -> dict[str, bytes]:
    return {p.relative_to(checkpoint).as_posix(): p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def expected(checkpoint):
    """Greedy tokens of the local directory."""
    return _generate(str(checkpoint))


def _generate(model: str, **options) -> list[list[int]]:
    from nanovllm import LLM, SamplingParams
    with LLM(model, **OPTIONS, **options) as llm:
        outs = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
        snapshot = llm.config.model
    return [o["token_ids"] for o in outs], snapshot


@pytest.fixture(scope="module")
def hub(files):
    hub = FakeHub()
    hub.sha = hub.add_repo("org/tiny", {**files, **NOT_FETCHED})
    hub.add_repo("org/binonly", {**{p: b for p, b in files.items() if not p.endswith(".safetensors")},
                                 "pytorch_model.bin": b"pickled weights"})
    hub.add_repo("org/noconfig", {p: b for p, b in files.items() if p != "config.json"})
    yield hub
    hub.stop()


def _point_at(monkeypatch, url: str, offline: bool = False) -> None:
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "ENDPOINT", url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)


@pytest.fixture
def online(hub, monkeypatch):
    _point_at(monkeypatch, hub.url)
    return hub


@pytest.mark.parametrize("revision", ["sha", "main"])
def test_a_repo_id_generates_what_its_directory_does(online, expected, tmp_path, revision, monkeypatch):
    from nanovllm import parallel
    started = []  # the model that parallel.start passes to every other rank
    start = parallel.start
    monkeypatch.setattr(parallel, "start", lambda model, *args: started.append(model) or start(model, *args))
    revision = online.sha if revision == "sha" else revision
    tokens, snapshot = _generate("org/tiny", revision=revision, download_dir=str(tmp_path))
    assert tokens == expected[0]
    assert snapshot == str(tmp_path / "models--org--tiny" / "snapshots" / online.sha)
    assert started == [snapshot]


def test_only_config_tokenizer_and_safetensors_are_fetched(online, files, tmp_path):
    from nanovllm.hub import resolve_model
    online.downloads.clear()
    path = resolve_model("org/tiny", None, str(tmp_path))
    fetched = sorted(p for repo, p in online.downloads if repo == "org/tiny")
    assert fetched == sorted(files)  # every file of the checkpoint, none of NOT_FETCHED
    on_disk = sorted(p.relative_to(path).as_posix() for p in Path(path).rglob("*") if p.is_file())
    assert on_disk == sorted(files)
    online.downloads.clear()
    assert resolve_model("org/tiny", online.sha, str(tmp_path)) == path  # cached: nothing fetched again
    assert online.downloads == []
    # load_format="dummy": no weights
    assert not list(Path(resolve_model("org/binonly", None, str(tmp_path / "d"), weights=False)).glob("*.bin"))


def test_offline_loads_the_cached_snapshot_with_the_hub_gone(files, expected, tmp_path, monkeypatch):
    from nanovllm.hub import resolve_model
    hub = FakeHub()
    hub.add_repo("org/tiny", {**files, **NOT_FETCHED})
    _point_at(monkeypatch, hub.url)
    path = resolve_model("org/tiny", None, str(tmp_path))
    hub.stop()
    _point_at(monkeypatch, hub.url, offline=True)
    tokens, snapshot = _generate("org/tiny", download_dir=str(tmp_path))
    assert (tokens, snapshot) == (expected[0], path)
    with pytest.raises(FileNotFoundError, match=r"HF_HUB_OFFLINE.*'org/other'.*'main'"):
        resolve_model("org/other", None, str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"HF_HUB_OFFLINE.*'org/tiny'.*'v2'"):
        resolve_model("org/tiny", "v2", str(tmp_path))
    # the environment variable itself, in a fresh process, the endpoint refusing connections
    code = "import sys; from nanovllm.hub import resolve_model; print(resolve_model('org/tiny', None, sys.argv[1]))"
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_ENDPOINT=hub.url)
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == path


def test_errors_name_the_repo_revision_and_file(online, tmp_path):
    from nanovllm import LLM
    from nanovllm.hub import resolve_model
    d = str(tmp_path)
    with pytest.raises(ValueError, match=r"no model repo 'org/missing'"):
        LLM("org/missing", download_dir=d, **OPTIONS)
    with pytest.raises(ValueError, match=r"no revision 'nope' of 'org/tiny'"):
        LLM("org/tiny", revision="nope", download_dir=d, **OPTIONS)
    with pytest.raises(FileNotFoundError, match=r"'org/binonly' at revision 'main' has no \*\.safetensors"):
        LLM("org/binonly", download_dir=d, **OPTIONS)
    with pytest.raises(FileNotFoundError, match=r"'org/noconfig' at revision 'main' has no config.json"):
        resolve_model("org/noconfig", None, d)
    for bad in ("a/b/c", "/no/such/dir", "./rel", "org/--x", "name"):
        with pytest.raises(FileNotFoundError, match=f"not found: '{bad}'"):
            resolve_model(bad, None, d)
    with pytest.raises(TypeError, match="tensor_paralel_size"):  # before any download
        LLM("org/missing", tensor_paralel_size=1)


def test_tensor_parallel_ranks_are_started_on_the_snapshot(online, expected, tmp_path, monkeypatch):
    """The spawned rank reads HF_ENDPOINT from the environment: had it resolved the repo id itself, the hub would
    have seen a second revision request."""
    monkeypatch.setenv("HF_ENDPOINT", online.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    online.requests.clear()
    tokens, snapshot = _generate("org/tiny", download_dir=str(tmp_path), tensor_parallel_size=2)
    assert tokens == expected[0]
    assert [path for _, path in online.requests if "/revision/" in path] == ["/api/models/org/tiny/revision/main"]


def test_serve_lists_the_repo_id_it_was_given(online, tmp_path, monkeypatch):
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    from serve_helpers import running_server
    monkeypatch.setenv("HF_ENDPOINT", online.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with running_server("org/tiny", tmp_path, "--revision", online.sha, "--download-dir", str(tmp_path / "hub"),
                        **OPTIONS) as base:
        models = httpx.get(f"{base}/v1/models").json()
        assert [m["id"] for m in models["data"]] == ["org/tiny"]
        out = httpx.post(f"{base}/v1/completions", json={"model": "org/tiny", "prompt": [5, 6, 7, 8, 9],
                                                         "max_tokens": 3, "temperature": 0}).json()
        assert out["choices"][0]["finish_reason"] == "length"
    assert (tmp_path / "hub" / "models--org--tiny" / "snapshots" / online.sha / "config.json").is_file()
