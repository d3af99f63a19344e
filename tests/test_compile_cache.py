"""Compile cache: keyed by what changes the code, safe under concurrent starts and corruption, and it
makes a second start skip Inductor compilation."""
import json
import logging
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import build_checkpoint
from nanovllm.compile import cache

CHILD = r"""
import json, sys, time
from torch._dynamo.utils import counters
from nanovllm import LLM
t = time.perf_counter()
llm = LLM(sys.argv[1], graph_batch_sizes=[2], max_num_seqs=2, kvcache_block_size=16, num_kvcache_blocks=16,
          max_model_len=64)
init = time.perf_counter() - t
out = llm.generate([[1, 2, 3]], None, use_tqdm=False)[0]["token_ids"]
print(json.dumps({"init": init, "hit": llm.engine.runner.executor.cache.hit, "tokens": out,
                  "fx_hit": counters["inductor"]["fxgraph_cache_hit"],
                  "fx_miss": counters["inductor"]["fxgraph_cache_miss"]}))
"""


def _start(model, cache_root, inductor_dir):
    env = dict(os.environ, NANOVLLM_CACHE_DIR=str(cache_root), TORCHINDUCTOR_CACHE_DIR=str(inductor_dir))
    env.pop("NANOVLLM_DISABLE_COMPILE_CACHE", None)
    return subprocess.Popen([sys.executable, "-c", CHILD, model], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _result(proc):
    out, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def test_concurrent_cold_starts_both_come_up_then_a_new_process_skips_inductor(tmp_path):
    model = build_checkpoint(tmp_path / "model", "qwen3")
    root = tmp_path / "nanovllm"
    first, second = (_result(p) for p in [_start(model, root, tmp_path / f"inductor{i}") for i in (1, 2)])
    assert sorted([first["hit"], second["hit"]]) == [False, True]  # one built under the lock, one loaded it
    assert first["tokens"] == second["tokens"]
    entries = cache.list_entries(root / "compile")
    assert len(entries) == 1 and entries[0]["size_mb"] > 0
    warm = _result(_start(model, root, tmp_path / "inductor3"))  # an empty Inductor cache: only ours can help
    cold = first if not first["hit"] else second
    print(f"\ncold init {cold['init']:.1f}s, warm init {warm['init']:.1f}s")
    assert warm["hit"] and warm["fx_miss"] == 0 and warm["fx_hit"] > 0
    assert cold["fx_miss"] > 0
    assert warm["init"] < cold["init"]
    assert warm["tokens"] == cold["tokens"]


def _compile_something():
    fn = torch.compile(lambda x: torch.sin(x) * 2 + 1, fullgraph=True)
    fn(torch.randn(8))


def test_corrupt_entry_is_discarded_with_one_warning_and_rebuilt(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    fields = {"model_config": {"a": 1}, "dtype": "torch.float32"}
    store = cache.CompileCache(fields, root=tmp_path)
    with store.activate():
        _compile_something()
    assert not store.hit and (store.entry / "artifacts.bin").exists()
    with open(store.entry / "artifacts.bin", "r+b") as f:
        f.truncate(10)
    again = cache.CompileCache(fields, root=tmp_path)
    with caplog.at_level(logging.WARNING, logger="nanovllm"):
        nanovllm_logger = logging.getLogger("nanovllm")
        nanovllm_logger.addHandler(caplog.handler)
        try:
            with again.activate():
                torch._dynamo.reset()
                _compile_something()
        finally:
            nanovllm_logger.removeHandler(caplog.handler)
    warnings = [r for r in caplog.records if "corrupt" in r.getMessage()]
    assert len(warnings) == 1 and not again.hit
    manifest = json.loads((again.entry / "manifest.json").read_text())
    assert manifest["size"] == len((again.entry / "artifacts.bin").read_bytes())  # rebuilt whole
    third = cache.CompileCache(fields, root=tmp_path)
    with third.activate():
        pass
    assert third.hit


def test_changing_any_key_field_misses(tmp_path):
    base = {"model_config": {"hidden_size": 64}, "dtype": "torch.bfloat16", "buckets": [1, 2, 4],
            "source_sha256": "abc", "tensor_parallel_size": 1}
    key = cache.key_of(base)
    for field, value in [("buckets", [1, 2]), ("dtype", "torch.float32"), ("source_sha256", "abd"),
                         ("tensor_parallel_size", 2), ("model_config", {"hidden_size": 128})]:
        assert cache.key_of(dict(base, **{field: value})) != key, field
    assert cache.key_of(dict(base)) == key


def test_source_hash_changes_when_a_traced_file_changes(tmp_path):
    copy = tmp_path / "nanovllm"
    shutil.copytree(cache._PACKAGE_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = cache.source_hash(copy)
    assert before == cache.source_hash(cache._PACKAGE_DIR)
    with open(copy / "layers" / "norm.py", "a") as f:
        f.write("\n# a change\n")
    assert cache.source_hash(copy) != before


def test_disabled_cache_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOVLLM_DISABLE_COMPILE_CACHE", "1")
    store = cache.CompileCache({"x": 1}, root=tmp_path / "c")
    with store.activate():
        pass
    assert not (tmp_path / "c").exists()


def test_precompile_list_and_clear(tmp_path, monkeypatch, capsys):
    from nanovllm import precompile
    monkeypatch.setenv("NANOVLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    store = cache.CompileCache({"model_config": {"architectures": ["Qwen3ForCausalLM"]}})
    with store.activate():
        _compile_something()
    precompile.main(["--list"])
    assert "1 entries" in capsys.readouterr().out
    precompile.main(["--clear"])
    assert "removed 1" in capsys.readouterr().out
    assert cache.list_entries() == []
