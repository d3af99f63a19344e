"""GPTQ and AWQ int4 checkpoints: packed words worked out by hand from each format's definition (AutoGPTQ's
``QuantLinear.pack``, AutoAWQ's ``WQLinear_GEMM.from_linear``) convert to and from our int4 format; random weights
round-trip, desc_act included (the permuted weight times ``x[:, perm]`` is the stored weight times ``x``); an
unsupported ``quantization_config`` is refused naming the field; ``quantize_checkpoint_int4`` rewrites per-expert
weights and a sharded index, and lifts a v1 zero of 0 to 1; ``synthesize --quantize gptq|awq`` writes the tensors
and config the real tools write, standing for the unquantized weights within half a quantization step."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_checkpoint
from nanovllm.kernels import int4_quant
from nanovllm.quant.int4_checkpoint import quantize_checkpoint_int4, quantize_linear
from nanovllm.quant.registry import checkpoint_scheme
from nanovllm.quant.int4_formats import awq_to_int4, gptq_to_int4, int4_to_awq, int4_to_gptq


def i32(*words: int) -> list[int]:
    """Unsigned 32-bit words as the int32 values safetensors stores."""
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]


def nibble(word: int, position: int) -> int:
    return (word >> (4 * position)) & 0xF


def gptq_reference(qweight, qzeros, scales, g_idx, v2=False) -> torch.Tensor:
    """The real weight [N, K] straight from GPTQ's definition, column by column through g_idx, in float32."""
    k, n = qweight.shape[0] * 8, qweight.shape[1]
    w = torch.empty(n, k)
    for col in range(k):
        g = int(g_idx[col])
        for row in range(n):
            code = nibble(int(qweight[col // 8, row]), col % 8)
            zero = nibble(int(qzeros[g, row // 8]), row % 8) + (0 if v2 else 1)
            w[row, col] = (code - zero) * float(scales[g, row])
    return w


def awq_reference(qweight, qzeros, scales, group) -> torch.Tensor:
    """The real weight [N, K] straight from AWQ's definition: column c at word position [0,2,4,6,1,3,5,7].index(c%8)."""
    position = [0, 4, 1, 5, 2, 6, 3, 7]
    k, n = qweight.shape[0], qweight.shape[1] * 8
    w = torch.empty(n, k)
    for col in range(k):
        for row in range(n):
            code = nibble(int(qweight[col, row // 8]), position[row % 8])
            zero = nibble(int(qzeros[col // group, row // 8]), position[row % 8])
            w[row, col] = (code - zero) * float(scales[col // group, row])
    return w


# 8 output rows, 8 input columns, one group: even rows hold codes 0..7, odd rows 8..15; real zeros 1..8
GPTQ_QWEIGHT = torch.tensor([i32(0x76543210, 0xFEDCBA98) * 4], dtype=torch.int32)  # [K/8, N]
GPTQ_QZEROS_V1 = torch.tensor([i32(0x76543210)], dtype=torch.int32)  # zero - 1 = 0..7
OURS_ROWS = [[0x10, 0x32, 0x54, 0x76], [0x98, 0xBA, 0xDC, 0xFE]]  # low nibble = even column


def test_gptq_words_worked_out_by_hand_read_as_our_rows_and_zeros_and_back():
    scales = torch.tensor([[0.5, 0.25, 1, 2, 4, 8, 0.125, 3]], dtype=torch.float16)
    qweight, scale, zero, perm = gptq_to_int4(GPTQ_QWEIGHT, GPTQ_QZEROS_V1, scales, torch.zeros(8, dtype=torch.int32),
                                              group=8)
    assert qweight.tolist() == OURS_ROWS * 4 and perm is None
    assert zero.tolist() == [[1], [2], [3], [4], [5], [6], [7], [8]] and scale.tolist() == scales.t().tolist()
    real = int4_quant.dequantize(qweight, scale, zero, 8, torch.float32)
    assert real[1, 3] == (11 - 2) * 0.25 and real[6, 0] == (0 - 7) * 0.125
    assert torch.equal(real, gptq_reference(GPTQ_QWEIGHT, GPTQ_QZEROS_V1, scales, [0] * 8))
    back = int4_to_gptq(qweight, scale, zero, group=8)
    assert [t.tolist() for t in back] == [GPTQ_QWEIGHT.tolist(), GPTQ_QZEROS_V1.tolist(), scales.tolist(), [0] * 8]


def test_gptq_v2_zeros_are_stored_as_they_are_and_v1_15_reads_as_16():
    scales = torch.ones(1, 8, dtype=torch.float16)
    _, _, zero, _ = gptq_to_int4(GPTQ_QWEIGHT, GPTQ_QZEROS_V1, scales, None, group=-1, v2=True)
    assert zero.flatten().tolist() == list(range(8))
    assert int4_to_gptq(int4_quant.pack(torch.zeros(8, 8)), scales.t(), zero, 8, v2=True)[1].tolist() == \
        GPTQ_QZEROS_V1.tolist()
    _, _, zero, _ = gptq_to_int4(GPTQ_QWEIGHT, torch.tensor([i32(0xFFFFFFFF)]), scales, None, group=-1)
    assert zero.flatten().tolist() == [16] * 8  # as AutoGPTQ's and vLLM's kernels read a v1 zero
    with pytest.raises(ValueError, match=r"zeros \[0, 1\] cannot be stored in a GPTQ v1"):
        int4_to_gptq(int4_quant.pack(torch.zeros(8, 8)), scales.t(), torch.tensor([[0], [1]] * 4), 8)


def test_awq_words_in_its_interleaved_order_worked_out_by_hand():
    # 2 input columns, 8 output rows (one group): row n has codes [n, 8 + n] and zero 15 - n; AutoAWQ packs rows
    # in the order [0, 2, 4, 6, 1, 3, 5, 7] from the low nibble up
    qweight_words = torch.tensor([i32(0x75316420), i32(0xFDB9ECA8)], dtype=torch.int32)  # [K, N/8]
    qzeros_words = torch.tensor([i32(0x8ACE9BDF)], dtype=torch.int32)  # [G, N/8]
    scales = torch.tensor([[1, 2, 3, 4, 0.5, 0.25, 6, 7]], dtype=torch.float16)
    qweight, scale, zero = awq_to_int4(qweight_words, qzeros_words, scales, group=128)
    assert qweight.tolist() == [[0x80], [0x91], [0xA2], [0xB3], [0xC4], [0xD5], [0xE6], [0xF7]]
    assert zero.flatten().tolist() == [15, 14, 13, 12, 11, 10, 9, 8]
    real = int4_quant.dequantize(qweight, scale, zero, 128, torch.float32)
    assert real[2].tolist() == [(2 - 13) * 3.0, (10 - 13) * 3.0]
    assert torch.equal(real, awq_reference(qweight_words, qzeros_words, scales, 2))
    back = int4_to_awq(qweight, scale, zero)
    assert [t.tolist() for t in back] == [qweight_words.tolist(), qzeros_words.tolist(), scales.tolist()]


def random_int4(n: int, k: int, group: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    groups = int4_quant.num_groups(k, group)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(n, groups, generator=gen) + 0.1).half()
    zero = torch.randint(1, 16, (n, groups), generator=gen, dtype=torch.uint8)
    return int4_quant.pack(codes), scale, zero


@pytest.mark.parametrize("k, group", [(48, 16), (40, 16), (64, -1)])
def test_random_int4_round_trips_through_gptq_and_awq(k, group):
    ours = random_int4(24, k, k if group == -1 else group)  # -1: one group per row
    for v2 in (False, True):
        qweight, scale, zero, perm = gptq_to_int4(*int4_to_gptq(*ours, group, v2=v2), group, v2=v2)
        assert perm is None and all(torch.equal(a, b) for a, b in zip((qweight, scale, zero), ours))
    assert all(torch.equal(a, b) for a, b in zip(awq_to_int4(*int4_to_awq(*ours), group), ours))


def test_desc_act_permutes_columns_so_x_perm_times_ours_is_x_times_the_stored_weight():
    n, k, group = 16, 40, 16
    gen = torch.Generator().manual_seed(3)
    g_idx = torch.empty(k, dtype=torch.int32)
    g_idx[torch.randperm(k, generator=gen)] = (torch.arange(k) // group).int()  # groups of 16, 16 and 8 columns
    ours = random_int4(n, k, group, seed=4)  # columns sorted by group
    stored = int4_to_gptq(*ours, group, g_idx=g_idx)
    assert torch.equal(stored[3], g_idx)
    qweight, scale, zero, perm = gptq_to_int4(*stored, group)
    assert all(torch.equal(a, b) for a, b in zip((qweight, scale, zero), ours))
    assert torch.equal(perm, torch.argsort(g_idx, stable=True).int())
    reference = gptq_reference(*stored)
    ours_real = int4_quant.dequantize(qweight, scale, zero, group, torch.float32)
    unpermuted = torch.empty_like(ours_real)
    unpermuted[:, perm.long()] = ours_real
    assert torch.equal(unpermuted, reference)
    x = torch.randn(3, k, generator=gen)
    torch.testing.assert_close(x[:, perm.long()] @ ours_real.t(), x @ reference.t())


def test_a_g_idx_with_uneven_groups_is_refused():
    g_idx = torch.tensor([0] * 9 + [1] * 7, dtype=torch.int32)
    ours = random_int4(8, 16, 8)
    with pytest.raises(ValueError, match=r"g_idx does not put 8 columns in each group \(group sizes \[9, 7\]"):
        int4_to_gptq(*ours, 8, g_idx=g_idx)


def gptq(**fields):
    return {"quantization_config": dict(dict(quant_method="gptq", bits=4, group_size=128, desc_act=False,
                                             sym=True), **fields)}


def test_the_int4_schemes_normalize_gptq_and_awq_fields():
    assert checkpoint_scheme(gptq(checkpoint_format="gptq_v2", desc_act=True, group_size=-1)).fields == dict(
        method="gptq", group=-1, sym=True, desc_act=True, v2=True, modules_to_not_convert=[])
    awq = dict(quant_method="awq", bits=4, group_size=128, zero_point=True, version="GEMM",
               modules_to_not_convert=["visual"])
    assert checkpoint_scheme({"text_config": {"quantization_config": awq}}).fields == dict(
        method="awq", group=128, sym=False, desc_act=False, v2=False, modules_to_not_convert=["visual"])
    assert checkpoint_scheme({}) is None


@pytest.mark.parametrize("quant, message", [
    (gptq(bits=8)["quantization_config"], r"quantization_config.bits=8 is not supported for quant_method='gptq'"),
    (gptq(checkpoint_format="marlin")["quantization_config"], r"checkpoint_format='marlin' is not supported"),
    (gptq(group_size=0)["quantization_config"], r"group_size=0 is not supported"),
    (dict(quant_method="awq", bits=4, group_size=128, zero_point=True, version="gemv"),
     r"quantization_config.version='gemv' is not supported for quant_method='awq' \(supported: 'gemm'\)"),
    (dict(quant_method="awq", bits=4, group_size=128, zero_point=False, version="gemm"), r"zero_point=False"),
])
def test_int4_config_refuses_an_unsupported_field_by_name(quant, message):
    with pytest.raises(ValueError, match=message):
        checkpoint_scheme({"quantization_config": quant})


@pytest.mark.parametrize("method, args, expected", [
    ("gptq", [], dict(quant_method="gptq", bits=4, group_size=128, desc_act=False, sym=True, checkpoint_format="gptq")),
    ("gptq", ["--group-size", "16", "--no-sym", "--desc-act"],
     dict(quant_method="gptq", bits=4, group_size=16, desc_act=True, sym=False, checkpoint_format="gptq")),
    ("awq", ["--group-size", "32"], dict(quant_method="awq", bits=4, group_size=32, zero_point=True, version="gemm")),
])
def test_synthesize_writes_the_int4_layouts_standing_for_the_unquantized_weights(tmp_path, method, args, expected):
    from nanovllm.tools import synthesize
    config = build_checkpoint(tmp_path / "src", "qwen3") + "/config.json"
    synthesize.main([config, str(tmp_path / "plain"), "--dtype", "float32"])
    synthesize.main([config, str(tmp_path / method), "--dtype", "float32", "--quantize", method, *args])
    plain = load_file(f"{tmp_path}/plain/model.safetensors")
    weights = load_file(f"{tmp_path}/{method}/model.safetensors")
    assert json.loads((tmp_path / method / "config.json").read_text())["quantization_config"] == expected
    group = expected["group_size"]
    prefix = "model.layers.1.mlp.down_proj."  # [N 64, K 128]
    g = -(-128 // group)
    shapes = {"qweight": (16, 64), "qzeros": (g, 8), "scales": (g, 64), "g_idx": (128,)} if method == "gptq" else \
        {"qweight": (128, 8), "qzeros": (g, 8), "scales": (g, 64)}
    assert {name[len(prefix):]: (t.dtype, tuple(t.shape)) for name, t in weights.items() if name.startswith(prefix)} \
        == {s: (torch.float16 if s == "scales" else torch.int32, shape) for s, shape in shapes.items()}
    assert not any(name.endswith("proj.weight") for name in weights)
    assert torch.equal(weights["model.embed_tokens.weight"], plain["model.embed_tokens.weight"])
    stored = [weights[prefix + s] for s in shapes]
    if method == "gptq":
        real, column_group = gptq_reference(*stored), stored[3].long()
        assert torch.equal(column_group, torch.arange(128) // group) != ("--desc-act" in args)
    else:
        real, column_group = awq_reference(*stored, group), torch.arange(128) // group
    step = stored[2].float()[column_group].t()  # the scale of each weight
    ratio = ((real - plain[prefix + "weight"]).abs() / step).max()
    assert ratio <= 0.51, ratio  # half a step, and the rounding of scales to float16


def test_a_v1_group_whose_zero_rounds_to_0_is_written_with_zero_1():
    weight = torch.arange(16.0).repeat(8, 1) / 10  # every group 0.0 .. 1.5: zero 0, which v1 (zero - 1) cannot hold
    stored = quantize_linear(weight, "gptq", 16, sym=False)
    assert stored["qzeros"].tolist() == [i32(0)]
    real = gptq_reference(*stored.values())
    assert real[0, :3].tolist() == pytest.approx([0.0, 0.1, 0.2], abs=1e-3) and real[0, -1] == pytest.approx(1.4, 1e-3)


def test_quantize_checkpoint_rewrites_per_expert_weights_and_a_sharded_index(tmp_path):
    from safetensors.torch import save_file
    path = Path(build_checkpoint(tmp_path / "moe", "qwen3_moe"))
    weights = load_file(path / "model.safetensors")
    (path / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in shards.items():
        save_file({n: weights[n] for n in part}, str(path / file), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, part in shards.items() for n in part}}
    (path / "model.safetensors.index.json").write_text(json.dumps(index))
    quantize_checkpoint_int4(path, "awq", group=32, skip=["self_attn"])
    written = {n: f for f in shards for n in load_file(path / f)}
    assert json.loads((path / "model.safetensors.index.json").read_text())["weight_map"] == written
    expert = "model.layers.0.mlp.experts.3.gate_proj."  # [32, 64]
    assert {n for n in written if n.startswith(expert)} == {expert + s for s in ("qweight", "qzeros", "scales")}
    assert {"model.layers.0.mlp.gate.weight", "model.layers.0.self_attn.q_proj.weight"} <= written.keys()
    assert json.loads((path / "config.json").read_text())["quantization_config"] == dict(
        quant_method="awq", bits=4, group_size=32, zero_point=True, version="gemm",
        modules_to_not_convert=["self_attn"])


@pytest.mark.parametrize("args, message", [
    (["--quantize", "fp8", "--group-size", "64"], "group_size, sym and desc_act are int4 options; quantize='fp8'"),
    (["--quantize", "awq", "--desc-act"], "desc_act=True is a GPTQ option; method='awq' has none"),
])
def test_synthesize_refuses_int4_options_where_they_mean_nothing(tmp_path, capsys, args, message):
    from nanovllm.tools import synthesize
    config = build_checkpoint(tmp_path / "src", "qwen3") + "/config.json"
    with pytest.raises(SystemExit):
        synthesize.main([config, str(tmp_path / "out"), "--dtype", "float32", *args])
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_the_oracle_tool_runs_transformers_on_a_gptq_checkpoints_dequantized_weights(tmp_path):
    """``tools/oracle.run`` on an int4 checkpoint: float32 identical; without the dequantized copy transformers
    could not load the checkpoint's qweight/qzeros/scales at all."""
    from nanovllm.tools import oracle
    path = build_checkpoint(tmp_path / "qwen3", "qwen3")
    quantize_checkpoint_int4(path, "gptq", group=32, sym=False)
    verdicts = oracle.run(path, "float32", "cpu", 3, 6, 0.0, enforce_eager=True, max_model_len=256,
                          kvcache_block_size=16, num_kvcache_blocks=64)
    assert [v["status"] for v in verdicts] == ["identical"] * 3
