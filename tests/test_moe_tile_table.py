"""The fused MoE's measured tile table (``nanovllm/kernels/moe_configs.py``): how ``choose`` and
``int4_dequantize_once`` read an entry for a GPU and shape, the defaults without one, the table a user names with
``NANOVLLM_MOE_TABLE``, down tiles of their own (``MoeConfig.down``) through the table, and
``benchmarks/moe_kernel.py --write-table`` turning timed rows into buckets (on CPU, with the GPU's name and
capability stood in).
"""
import dataclasses
import json

import pytest
import torch

from nanovllm.kernels import moe_configs
from nanovllm.kernels.moe_configs import DEFAULTS, MoeConfig, choose, int4_dequantize_once, tuned
from nanovllm.kernels.options import KernelOptions, current_options, set_options

SHAPE = (128, 768, 2048)  # Qwen3-30B-A3B: E, I, H


@pytest.fixture
def table(tmp_path):
    """A table path in force (NANOVLLM_MOE_TABLE), restored afterwards."""
    saved = current_options()
    path = tmp_path / "moe_tuned.json"
    set_options(KernelOptions.from_env({"NANOVLLM_MOE_TABLE": str(path)}))
    yield path
    set_options(saved)


def reread():
    """Forget the tables read so far (the module caches them by path)."""
    moe_configs.load.cache_clear()
    moe_configs._tuned.cache_clear()


def write(path, entry):
    path.write_text(json.dumps({"arch": {"9.0": {moe_configs.table_key(*SHAPE): entry}}}))
    reread()


def test_defaults_serve_every_mode_without_an_entry(table):
    assert tuned(None, *SHAPE) == {} and tuned("9.0", *SHAPE) == {}  # the CPU; a GPU the table lacks
    assert choose(256, 8, 128, "w8a8") == DEFAULTS["w8a8"][0][1] and choose(4096, 8, 128, "w8a8").block_m == 64
    assert choose(16, 8, 128, "fp8").block_n == 64 and choose(16, 8, 128, "int4") == choose(16, 8, 128, "bf16")
    rows = moe_configs.INT4_DEQUANTIZE_ROWS
    assert not int4_dequantize_once(rows * 16, 8, 128) and int4_dequantize_once(rows * 16 + 16, 8, 128)


def test_an_entry_decides_for_its_gpu_and_shape_only(table):
    small, large = MoeConfig(16, 64, 128, swap=True), MoeConfig(64, 128, 64, num_warps=8, num_stages=4)
    write(table, moe_configs.entry_json({"int4": [(16, small), (float("inf"), large)]}, once_rows=64))
    entry = tuned("9.0", *SHAPE)
    assert entry["int4"] == ((16, small), (float("inf"), large)) and entry["int4_once_rows"] == 64
    assert choose(256, 8, 128, "int4", entry) == small and choose(257, 8, 128, "int4", entry) == large
    assert choose(256, 8, 128, "bf16", entry) == DEFAULTS["bf16"][0][1]  # a mode the entry lacks
    assert not int4_dequantize_once(1024, 8, 128, entry) and int4_dequantize_once(1040, 8, 128, entry)
    assert tuned("8.0", *SHAPE) == {} and tuned("9.0", 8, 14336, 4096) == {}
    write(table, moe_configs.entry_json({"int4": [(float("inf"), small)]}, once_rows=None))
    assert not int4_dequantize_once(10 ** 6, 8, 128, tuned("9.0", *SHAPE))  # null: never


def test_down_tiles_round_trip_and_must_share_block_m(table):
    own = MoeConfig(32, 128, 128, num_warps=8, down=MoeConfig(32, 64, 128, num_stages=4, swap=False))
    write(table, moe_configs.entry_json({"w8a8": [(16, own), (float("inf"), MoeConfig(64, 128, 128))]}))
    entry = tuned("9.0", *SHAPE)
    assert entry["w8a8"][0] == (16, own) and entry["w8a8"][1][1].down is None
    assert choose(256, 8, 128, "w8a8", entry).down_tiles.block_n == 64 and own.down_tiles.num_warps == 4
    assert MoeConfig(64, 128, 128).down_tiles == MoeConfig(64, 128, 128)
    assert own.launch() == dict(SWAP=False, num_warps=8, num_stages=3) and own.launch(64)["SWAP"]
    with pytest.raises(ValueError, match="block_m 32"):
        MoeConfig(32, 128, 128, down=MoeConfig(16, 64, 128))


def test_write_table_keeps_the_fastest_per_count_and_merges(table, monkeypatch):
    moe_kernel = pytest.importorskip("benchmarks.moe_kernel")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stand-in H100")
    a, b = MoeConfig(16, 64, 128), MoeConfig(32, 128, 64, swap=True)
    own = dataclasses.replace(a, down=MoeConfig(16, 256, 128, num_warps=8))  # a set the down stage timed

    def row(mode, t, cfg, us):
        return {"weights": mode, "tokens": t, "us": us, **dataclasses.asdict(cfg)}
    rows = [row("int4", 16, a, 5.0), row("int4", 16, b, 6.0), row("int4", 256, a, 9.0), row("int4", 256, b, 8.0),
            row("int4", 4096, b, 90.0), row("int4-once", 16, b, 50.0), row("int4-once", 256, b, 20.0),
            row("int4-once", 4096, b, 60.0), row("w8a8", 16, a, 4.0), row("w8a8", 16, own, 3.0)]
    write(table, {"bf16": [[None, dataclasses.asdict(a)]]})  # an entry already there keeps its other modes
    moe_kernel.write_table(rows)
    reread()
    entry = tuned("9.0", *SHAPE)
    assert entry["int4"] == ((1.0, a), (float("inf"), b))  # 256 and 4096 took b: one bucket
    assert entry["int4_once_rows"] == 16.0  # the int4 kernels last won at 256 tokens, 16 rows per expert
    assert entry["w8a8"] == ((float("inf"), own),) and entry["bf16"] == ((float("inf"), a),)
    assert json.loads(table.read_text())["devices"] == {"9.0": "stand-in H100"}


def test_the_shipped_table_loads_and_its_buckets_ascend():
    raw = moe_configs.load(str(moe_configs.TABLE_PATH))
    assert raw["arch"], "moe_tuned.json has no GPU"
    for arch, shapes in raw["arch"].items():
        assert arch in raw["devices"]
        for key, entry in shapes.items():
            e, i, h = map(int, key.split(","))
            parsed = moe_configs._tuned(str(moe_configs.TABLE_PATH), arch, key)
            assert set(parsed) - {"int4_once_rows"} <= set(moe_configs.MODES) and parsed, key
            for mode, buckets in ((m, b) for m, b in parsed.items() if m in moe_configs.MODES):
                limits = [limit for limit, _ in buckets]
                assert limits == sorted(limits) and limits[-1] == float("inf"), (key, mode, limits)
                assert all(cfg.block_k <= max(h, i) and cfg.block_m in (16, 32, 64, 128) for _, cfg in buckets)
