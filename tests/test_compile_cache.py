"""Compile cache: keyed by what changes the code, safe under concurrent starts and corruption, and after
``python -m nanovllm.precompile`` a new process's ``LLM(...)`` does no Dynamo trace and no Inductor compilation."""
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from conftest import build_checkpoint, free_port
from nanovllm.compile import cache, saved_step

ARGS = dict(graph_batch_sizes=[2], max_num_seqs=2, kvcache_block_size=16, num_kvcache_blocks=16, max_model_len=64)
PRECOMPILE_ARGS = ["--graph-batch-sizes", "2", "--max-num-seqs", "2", "--kvcache-block-size", "16",
                   "--num-kvcache-blocks", "16", "--max-model-len", "64"]
CHILD = r"""
import json, sys, time
from torch._dynamo.utils import counters
from nanovllm import LLM
t = time.perf_counter()
llm = LLM(sys.argv[1], **json.loads(sys.argv[2]))
init = time.perf_counter() - t
out = llm.generate([[1, 2, 3]], None, use_tqdm=False)[0]["token_ids"]
ex = llm.engine.runner.executor
c = ex.cache
print(json.dumps({"init": init, "hit": c.hit, "key": c.key, "tokens": out, "origin": ex.step_origin,
                  "dynamo_graphs": counters["stats"]["unique_graphs"],
                  "fx_hit": counters["inductor"]["fxgraph_cache_hit"],
                  "fx_miss": counters["inductor"]["fxgraph_cache_miss"],
                  "aot_hit": counters["aot_autograd"]["autograd_cache_hit"]}))
"""


def _env(cache_root, inductor_dir):
    """A fresh, empty Inductor cache of the child's own: only our cache can supply compiled artifacts."""
    env = dict(os.environ, NANOVLLM_CACHE_DIR=str(cache_root), TORCHINDUCTOR_CACHE_DIR=str(inductor_dir))
    env.pop("NANOVLLM_DISABLE_COMPILE_CACHE", None)
    env.pop("TRITON_CACHE_DIR", None)
    return env


def _popen(argv, env):
    return subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _finish(proc) -> str:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return out


@pytest.mark.slow
def test_concurrent_cold_starts_then_a_new_process_traces_and_compiles_nothing(tmp_path):
    model = build_checkpoint(tmp_path / "model", "qwen3")
    root = tmp_path / "nanovllm"
    # precompile and an LLM start on the same key at once: one builds under the lock, the other loads it
    pre = _popen(["-m", "nanovllm.precompile", "--model", model, *PRECOMPILE_ARGS], _env(root, tmp_path / "ind1"))
    llm = _popen(["-c", CHILD, model, json.dumps(ARGS)], _env(root, tmp_path / "ind2"))
    pre_out, child = _finish(pre), json.loads(_finish(llm).strip().splitlines()[-1])
    print("\n" + pre_out)
    pre_hit = "cache hit;" in pre_out
    assert pre_hit != child["hit"], (pre_out, child)
    assert re.search(r"key (\w+)", pre_out).group(1) == child["key"]  # precompile warms what LLM(...) looks up
    assert re.search(r"bucket +2: +[\d.]+ s", pre_out)
    entries = cache.list_entries(root / "compile")
    assert len(entries) == 1 and entries[0]["key"] == child["key"] and entries[0]["size_mb"] > 0

    warm_inductor = tmp_path / "ind3"
    warm = json.loads(_finish(_popen(["-c", CHILD, model, json.dumps(ARGS)], _env(root, warm_inductor)))
                      .strip().splitlines()[-1])
    cold_init = child["init"] if not child["hit"] else float(re.search(r"total: ([\d.]+) s", pre_out).group(1))
    print(f"cold init {cold_init:.1f}s, warm init {warm['init']:.1f}s")
    assert warm["hit"] and warm["fx_miss"] == 0
    if saved_step.aot_unsupported_reason() is None:  # the saved step is loaded: Dynamo traces nothing
        assert warm["origin"] == "loaded" and warm["dynamo_graphs"] == 0
        assert (root / "compile" / child["key"] / "step.bin").is_file()
    else:  # Dynamo traces; AOTAutograd and Inductor come from the cache
        assert warm["origin"] == "traced" and warm["fx_hit"] > 0 and warm["aot_hit"] > 0
    probes = {p for d in (warm_inductor, root / "compile" / child["key"] / "inductor") for p in d.rglob("*.cpp")
              if "_chk_kernel" in p.read_text(errors="replace")}  # Inductor's probes of the CPU's vector kinds
    assert probes and all(warm_inductor in p.parents for p in probes), "the probes went into the entry"
    assert not [so for so in warm_inductor.rglob("*.so") if so.with_suffix(".cpp") not in probes], \
        "Inductor compiled outside the cache entry"
    assert warm["init"] < cold_init
    assert warm["tokens"] == child["tokens"]


def _compile_something():
    torch._dynamo.reset()
    fn = torch.compile(lambda x: torch.sin(x) * 2 + 1, fullgraph=True)
    assert torch.allclose(fn(torch.ones(8)), torch.sin(torch.ones(8)) * 2 + 1)


FIELDS = {"model_config": {"architectures": ["Qwen3ForCausalLM"]}, "dtype": "torch.float32"}


@pytest.fixture(scope="module")
def built_entry(tmp_path_factory):
    """One small compiled entry, copied by each corruption test."""
    root = tmp_path_factory.mktemp("built")
    store = cache.CompileCache(FIELDS, root=root)
    with store.activate():
        _compile_something()
    assert not store.hit and (store.entry / "manifest.json").exists()
    assert any(f.suffix == ".so" for f in (store.entry / "inductor").rglob("*"))
    return store.entry


def _flip_a_byte_of_a_kernel(entry):
    so = sorted((entry / "inductor").rglob("*.so"))[0]
    data = bytearray(so.read_bytes())
    data[len(data) // 2] ^= 0xFF
    so.write_bytes(bytes(data))


CORRUPTIONS = {
    "truncated_artifacts": lambda e: open(e / "artifacts.bin", "r+b").truncate(10),
    "corrupt_kernel": _flip_a_byte_of_a_kernel,
    "garbage_manifest": lambda e: (e / "manifest.json").write_text("{not json"),
    "no_manifest": lambda e: (e / "manifest.json").unlink(),  # a build that died before finishing
}


@pytest.mark.parametrize("corruption", [c if c in ("truncated_artifacts", "no_manifest") else
                                        pytest.param(c, marks=pytest.mark.slow) for c in CORRUPTIONS])
def test_corrupt_entry_is_discarded_with_one_warning_and_rebuilt(built_entry, corruption, tmp_path, caplog):
    root = tmp_path / "compile"
    shutil.copytree(built_entry, root / built_entry.name)
    store = cache.CompileCache(FIELDS, root=root)
    assert store.entry == root / built_entry.name
    CORRUPTIONS[corruption](store.entry)
    nanovllm_logger = logging.getLogger("nanovllm")
    nanovllm_logger.addHandler(caplog.handler)
    try:
        with store.activate():
            _compile_something()
    finally:
        nanovllm_logger.removeHandler(caplog.handler)
    warnings = [r for r in caplog.records if r.name == "nanovllm" and r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "corrupt" in warnings[0].getMessage() and not store.hit
    manifest = json.loads((store.entry / "manifest.json").read_text())
    assert manifest["size"] == len((store.entry / "artifacts.bin").read_bytes())  # rebuilt whole
    again = cache.CompileCache(FIELDS, root=root)
    with again.activate():
        _compile_something()
    assert again.hit


def _key(**overrides):
    """key_fields of a small config on a fake CPU platform, with one field or argument changed."""
    cfg = SimpleNamespace(hf_config={"hidden_size": 64}, graph_batch_sizes=(1, 2, 4), kvcache_block_size=16,
                          max_model_len=128, max_num_seqs=4, tensor_parallel_size=1, online_quantization=None,
                          enable_lora=False, max_loras=1, max_lora_rank=16)
    option_values = overrides.pop("options", {"pdl": False})
    options = SimpleNamespace(as_dict=lambda: option_values)
    versions = overrides.pop("versions", {})
    args = dict(dtype=torch.float32, kv_dtype=torch.float32, num_kv_blocks=96,
                platform=SimpleNamespace(name="cpu", arch=lambda: "x86_64", options=options, versions=lambda: versions))
    for name, value in overrides.items():
        setattr(cfg, name, value) if hasattr(cfg, name) else args.__setitem__(name, value)
    return cache.key_of(cache.key_fields(cfg, **args))


def test_changing_any_key_field_misses(monkeypatch):
    key = _key()
    assert _key() == key
    other_platform = SimpleNamespace(name="npu", arch=lambda: "x86_64", options=SimpleNamespace(as_dict=dict),
                                     versions=dict)
    for name, value in [("graph_batch_sizes", (1, 2)), ("dtype", torch.bfloat16), ("num_kv_blocks", 95),
                        ("kv_dtype", torch.float8_e4m3fn), ("online_quantization", "fp8"),
                        ("kvcache_block_size", 32), ("max_model_len", 64), ("max_num_seqs", 8),
                        ("tensor_parallel_size", 2), ("hf_config", {"hidden_size": 128}),
                        ("platform", other_platform), ("options", {"pdl": True}),
                        ("versions", {"cann": "8.5.0", "torch_npu": "2.13.0"}), ("enable_lora", True)]:
        assert _key(**{name: value}) != key, name
    monkeypatch.setattr(cache, "source_hash", lambda: "0" * 64)
    assert _key() != key, "traced source"


def test_source_hash_changes_when_a_traced_file_changes(tmp_path):
    copy = tmp_path / "nanovllm"
    shutil.copytree(cache._PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = cache.source_hash(copy)
    assert before == cache.source_hash(cache._PACKAGE_DIR)
    for traced in ("layers/norm.py", "step/inputs.py", "kernels/ops.py", "platforms/cpu.py"):
        with open(copy / traced, "a") as f:
            f.write("\n# a change\n")
        assert cache.source_hash(copy) != before, traced
        before = cache.source_hash(copy)
    (copy / "llm.py").write_text("# not traced\n")
    assert cache.source_hash(copy) == before


def test_inductor_is_pointed_at_the_entry_and_restored(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    store = cache.CompileCache({"x": 2}, root=tmp_path / "c")
    with store.activate():
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(store.entry / "inductor")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    assert "TRITON_CACHE_DIR" not in os.environ


def test_disabled_cache_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOVLLM_DISABLE_COMPILE_CACHE", "1")
    store = cache.CompileCache({"x": 1}, root=tmp_path / "c")
    with store.activate():
        _compile_something()
    assert not (tmp_path / "c").exists() and not store.hit


def test_precompile_list_and_clear(built_entry, tmp_path, monkeypatch, capsys):
    from nanovllm import precompile
    monkeypatch.setenv("NANOVLLM_CACHE_DIR", str(tmp_path))
    shutil.copytree(built_entry, tmp_path / "compile" / built_entry.name)
    precompile.main(["--list"])
    out = capsys.readouterr().out
    assert "1 entries" in out and built_entry.name in out and "Qwen3ForCausalLM" in out
    precompile.main(["--clear"])
    assert "removed 1" in capsys.readouterr().out
    assert cache.list_entries() == []


def test_platform_compiler_files_are_kept_checksummed_and_verified(tmp_path):
    """A platform compiler's own cache (torchair's, on the NPU) lives in the entry's ``platform/``: an entry made of
    it alone is saved, a warm start that adds nothing is a hit, and a changed file discards the entry."""
    root = tmp_path / "compile"
    store = cache.CompileCache(FIELDS, root=root)
    with store.activate():
        (store.platform_dir / "decode_4").mkdir()
        (store.platform_dir / "decode_4" / "compiled_module").write_text("graph")
    manifest = json.loads((store.entry / "manifest.json").read_text())
    assert not store.hit and list(manifest["platform_files"]) == ["decode_4/compiled_module"]
    again = cache.CompileCache(FIELDS, root=root)
    with again.activate():
        assert (again.platform_dir / "decode_4" / "compiled_module").read_text() == "graph"
    assert again.hit
    (root / store.key / "platform" / "decode_4" / "compiled_module").write_text("stale")
    third = cache.CompileCache(FIELDS, root=root)
    with third.activate():
        assert not (third.platform_dir / "decode_4").exists()  # discarded before the compiler runs
    assert not third.hit


def _activate_on_rank(rank: int, port: int, held: tuple, results) -> None:
    from nanovllm import distributed
    distributed.init_process_group("gloo", rank, 2, init_method=f"tcp://127.0.0.1:{port}", timeout_s=20)
    store = cache.CompileCache(dict(FIELDS, rank=rank), root=None)
    store.enabled = True
    # an entry with nothing to hot-load (b"") where this rank holds one; None: no entry
    store._verified_artifacts = lambda: b"" if held[rank] else None
    with store.activate():
        pass
    results[rank] = store.loaded
    torch.distributed.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("held", [(True, True), (True, False)], ids=["both", "rank-0-only"])
def test_tensor_parallel_ranks_load_their_entries_only_if_every_rank_has_one(held, tmp_path, monkeypatch):
    """One rank loading while another compiles for minutes would look like a peer that stopped answering: the
    ranks agree, and if any lacks its entry every rank rebuilds."""
    import torch.multiprocessing as mp
    monkeypatch.setenv("NANOVLLM_CACHE_DIR", str(tmp_path))  # the spawned ranks inherit it
    with mp.get_context("spawn").Manager() as manager:  # no fork of this threaded process
        results = manager.dict()
        mp.spawn(_activate_on_rank, args=(free_port(), held, results), nprocs=2)
        assert dict(results) == {0: all(held), 1: all(held)}
