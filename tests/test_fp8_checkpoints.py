"""Block-FP8 checkpoints (the Qwen3-*-FP8 layout: float8 weights, a ``weight_scale_inv`` per block) load as stored:
the projections and experts stay float8 in memory with their scales, and greedy float32 tokens equal transformers'
on a float32 copy whose weights are the dequantized ones, in eager and graph mode, dense, MoE and hybrid, at one
rank and two (a rank's rows may start inside a block; its columns may not: refused by name, as a bad block size or
format is); ``synthesize --quantize fp8`` writes one that loads."""
import json
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_checkpoint, hf_greedy
from nanovllm import LLM, SamplingParams
from nanovllm.quant.fp8_checkpoint import dequantize, quantize_checkpoint_fp8

ENGINE = dict(kvcache_block_size=16, num_kvcache_blocks=32, max_model_len=128, max_num_seqs=4,
              graph_batch_sizes=[1, 2, 4])
BLOCK = (32, 48)  # partial blocks: 64 = 48 + 16 columns, 128 = 2 * 48 + 32, head_dim 32 and 16 KV rows
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def prompts_of(n, seed, max_len):
    rng = random.Random(seed)
    return [[rng.randint(3, 383) for _ in range(rng.randint(1, max_len))] for _ in range(n)]


def fp8_checkpoint(tmp_path, arch, block=BLOCK, **quantize) -> str:
    path = build_checkpoint(tmp_path / arch, arch)
    quantize_checkpoint_fp8(path, block, **quantize)
    return path


def dequantized_copy(path: str, out: Path, block=BLOCK) -> str:
    """A float32 checkpoint of the weights ``path`` stands for (weight x scale per block), without its
    quantization_config: what transformers runs as the oracle."""
    out.mkdir()
    weights = load_file(f"{path}/model.safetensors")
    plain = {name: dequantize(t, weights[name + "_scale_inv"], block) if t.dtype == torch.float8_e4m3fn else t
             for name, t in weights.items() if not name.endswith("_scale_inv")}
    save_file(plain, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads(Path(path, "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    return str(out)


def dequantized_copy_of(weights: dict, path: str, out: Path) -> str:
    """``dequantized_copy`` of the checkpoint ``weights`` (with ``path``'s config.json)."""
    tmp = out.with_name(out.name + "-one-file")
    tmp.mkdir()
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(Path(path, "config.json").read_text())
    return dequantized_copy(str(tmp), out)


def greedy(llm, prompts):
    return [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


@pytest.fixture(scope="module", params=["qwen3", pytest.param("llama", marks=pytest.mark.slow),
                                        pytest.param("qwen3_moe", marks=pytest.mark.slow)])
def quantized(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    path = fp8_checkpoint(tmp, request.param)
    return path, dequantized_copy(path, tmp / "dequantized")


def test_the_checkpoint_is_stored_in_float8_blocks(quantized):
    weights = load_file(f"{quantized[0]}/model.safetensors")
    fp8 = [n for n, t in weights.items() if t.dtype == torch.float8_e4m3fn]
    assert fp8 and all(n.endswith("proj.weight") for n in fp8)
    for name in fp8:
        rows, cols = weights[name].shape
        assert weights[name + "_scale_inv"].shape == (-(-rows // BLOCK[0]), -(-cols // BLOCK[1]))
    assert any(weights[n].shape[1] % BLOCK[1] for n in fp8)  # some blocks are partial
    plain = [n for n in weights if n not in fp8 and not n.endswith("_scale_inv")]
    assert all(weights[n].dtype == torch.float32 and n + "_scale_inv" not in weights for n in plain)
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(plain)
    if "model.layers.0.mlp.gate.weight" in weights:  # MoE: the router stays, the experts are quantized
        assert "model.layers.0.mlp.gate.weight" in plain and "model.layers.0.mlp.experts.7.down_proj.weight" in fp8


def test_eager_and_graph_match_transformers_on_the_dequantized_weights(quantized):
    path, plain = quantized
    prompts = prompts_of(5, seed=1, max_len=40)
    want = hf_greedy(plain, prompts, GREEDY.max_tokens)
    eager = LLM(path, enforce_eager=True, **ENGINE)
    assert re.fullmatch(r"fp8 weights \((\d+) of \1 projections and expert stacks, scales per row and 48 columns\), "
                        r"from an fp8 checkpoint \(block 32x48\)",
                        eager.engine.describe()["quantization"])
    layer = eager.engine.runner.model.model.layers[0]
    assert layer.self_attn.qkv_proj.weight.dtype == torch.float8_e4m3fn
    assert layer.self_attn.qkv_proj.weight_scale.shape == (layer.self_attn.qkv_proj.weight.shape[0], 2)
    assert greedy(eager, prompts) == want
    graph = LLM(path, **ENGINE)
    assert graph.engine.runner.mode == "graph"
    assert greedy(graph, prompts) == want


def test_the_dequantized_weights_are_not_the_original_ones(tmp_path):
    original = build_checkpoint(tmp_path / "qwen3", "qwen3")
    before = load_file(f"{original}/model.safetensors")["model.layers.0.self_attn.q_proj.weight"]
    quantize_checkpoint_fp8(original, BLOCK)
    plain = load_file(dequantized_copy(original, tmp_path / "plain") + "/model.safetensors")
    after = plain["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(before, after) and torch.allclose(before, after, rtol=0.07, atol=1e-3)


def test_each_block_is_scaled_by_its_own_scale():
    weight = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [-1.0, -2.0, -3.0]]).to(torch.float8_e4m3fn)
    scale_inv = torch.tensor([[0.5, 10.0], [2.0, 0.25]])  # block 2x2: the third row and column are partial blocks
    assert dequantize(weight, scale_inv, (2, 2)).tolist() == [[0.5, 1.0, 30.0], [2.0, 2.5, 60.0],
                                                             [-2.0, -4.0, -0.75]]


def test_modules_to_not_convert_stay_unquantized_and_load(tmp_path):
    path = fp8_checkpoint(tmp_path, "qwen3", modules_to_not_convert=["layers.1.mlp"])
    weights = load_file(f"{path}/model.safetensors")
    assert weights["model.layers.1.mlp.up_proj.weight"].dtype == torch.float32
    assert "model.layers.1.mlp.up_proj.weight_scale_inv" not in weights
    assert weights["model.layers.0.mlp.up_proj.weight"].dtype == torch.float8_e4m3fn
    config = json.loads(Path(path, "config.json").read_text())
    assert config["quantization_config"]["modules_to_not_convert"] == ["layers.1.mlp"]
    prompts = prompts_of(3, seed=2, max_len=20)
    plain = dequantized_copy(path, tmp_path / "plain")
    assert greedy(LLM(path, enforce_eager=True, **ENGINE), prompts) == hf_greedy(plain, prompts, GREEDY.max_tokens)


def test_a_scale_in_another_shard_file_is_found(tmp_path):
    path = fp8_checkpoint(tmp_path, "llama")
    weights = load_file(f"{path}/model.safetensors")
    scales = {n: t for n, t in weights.items() if n.endswith("_scale_inv")}
    rest = {n: t for n, t in weights.items() if n not in scales}
    Path(path, "model.safetensors").unlink()
    save_file(rest, f"{path}/model-00001-of-00002.safetensors", metadata={"format": "pt"})
    save_file(scales, f"{path}/model-00002-of-00002.safetensors", metadata={"format": "pt"})
    index = {"weight_map": {n: f"model-0000{1 + (n in scales)}-of-00002.safetensors" for n in weights}}
    Path(path, "model.safetensors.index.json").write_text(json.dumps(index))
    prompts = prompts_of(2, seed=3, max_len=20)
    plain = dequantized_copy_of(weights, path, tmp_path / "plain")
    assert greedy(LLM(path, enforce_eager=True, **ENGINE), prompts) == hf_greedy(plain, prompts, GREEDY.max_tokens)


def refused_without_scale(path: str, weight: str, scale: str) -> None:
    """Drop tensor ``scale`` from the checkpoint at ``path``: loading it must raise naming ``weight`` and ``scale``."""
    weights = load_file(f"{path}/model.safetensors")
    del weights[scale]
    save_file(weights, f"{path}/model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=re.escape(f"'{weight}' is float8 but the checkpoint has no '{scale}'")):
        LLM(path, enforce_eager=True, **ENGINE)


def test_a_float8_weight_without_its_scale_is_refused_by_name(tmp_path):
    refused_without_scale(fp8_checkpoint(tmp_path, "qwen3"), "model.layers.1.self_attn.o_proj.weight",
                          "model.layers.1.self_attn.o_proj.weight_scale_inv")


@pytest.mark.parametrize("field,value", [("weight_block_size", [128]), ("weight_block_size", [128, 0]),
                                         ("weight_block_size", None), ("weight_block_size", [128.0, 128]),
                                         ("fmt", "e5m2"), ("activation_scheme", "static")])
def test_a_bad_fp8_config_is_refused_naming_the_field(tmp_path, field, value):
    path = fp8_checkpoint(tmp_path, "qwen3")
    config_path = Path(path, "config.json")
    config = json.loads(config_path.read_text())
    config["quantization_config"][field] = value
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"quantization_config.{field}={value!r} is not supported".replace(
            "[", r"\[").replace("]", r"\]")):
        LLM(path, enforce_eager=True, **ENGINE)


@pytest.mark.slow
def test_two_ranks_equal_one(tmp_path):
    path = fp8_checkpoint(tmp_path, "qwen3", block=(32, 32))  # every rank's shard a whole number of blocks
    prompts = prompts_of(4, seed=4, max_len=30)
    one = greedy(LLM(path, enforce_eager=True, **ENGINE), prompts)
    two = LLM(path, tensor_parallel_size=2, enforce_eager=True, **ENGINE)
    try:
        assert greedy(two, prompts) == one
    finally:
        two.close()


HYBRID_BLOCK = (16, 8)  # in_proj_b / in_proj_a (Qwen3.5: 4 rows) and in_proj_ba (Qwen3-Next: 8): each rank's
# rows lie inside one block; every rank's columns (32 value channels, 16 and 24 expert rows) are whole blocks


@pytest.mark.parametrize("arch", ["qwen3_5", pytest.param("qwen3_next", marks=pytest.mark.slow)])  # 5 s, 25 s
def test_a_hybrid_checkpoint_at_one_and_two_ranks_matches_the_dequantized_weights(tmp_path, arch):
    """Gated DeltaNet projections in float8 blocks: Qwen3.5's q/k/v projection is loaded whole and each rank keeps
    its q, k and v channels with their scales (``quant/held.keep_rows``); rows that start inside a block are read
    with the whole block's scales, then cut."""
    path = fp8_checkpoint(tmp_path, arch, block=HYBRID_BLOCK)
    prompts = prompts_of(3, seed=6, max_len=40)
    want = hf_greedy(dequantized_copy(path, tmp_path / "plain", block=HYBRID_BLOCK), prompts, GREEDY.max_tokens)
    assert greedy(LLM(path, enforce_eager=True, **ENGINE), prompts) == want
    two = LLM(path, tensor_parallel_size=2, enforce_eager=True, **ENGINE)
    try:
        linear = next(layer.linear_attn for layer in two.engine.runner.model.model.layers
                      if layer.kind == "linear_attention")
        ba = linear.in_proj_ba if arch == "qwen3_next" else linear.in_proj_b
        assert ba.weight.dtype == torch.float8_e4m3fn and ba.weight.shape[0] == ba.weight_scale.shape[0] == 2 * (
            1 + (arch == "qwen3_next"))  # 2 of the 4 value heads (b and a interleaved in Qwen3-Next's)
        if arch == "qwen3_5":
            qkv = linear.in_proj_qkv
            assert qkv.weight.dtype == torch.float8_e4m3fn
            assert qkv.weight.shape[0] == qkv.weight_scale.shape[0] == linear.la.conv_dim < linear.whole.conv_dim
        assert greedy(two, prompts) == want
    finally:
        two.close()


def test_a_shard_that_splits_a_block_is_refused_naming_the_tensor_and_sizes(tmp_path):
    path = fp8_checkpoint(tmp_path, "qwen3", block=(48, 48))  # down_proj's 128 columns split in two: 64 is not 48k
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.down_proj.weight': weight_block_size "
                                         r"\[48, 48\] does not divide this tensor-parallel rank's shard, columns "
                                         r"0:64 of 128 \(a shard of 64\)"):
        LLM(path, tensor_parallel_size=2, enforce_eager=True, **ENGINE)


def test_synthesize_writes_an_fp8_checkpoint_that_loads(tmp_path):
    from nanovllm.tools import synthesize
    config = build_checkpoint(tmp_path / "src", "qwen3") + "/config.json"
    out = tmp_path / "fp8"
    synthesize.main([config, str(out), "--dtype", "float32", "--quantize", "fp8"])
    weights = load_file(f"{out}/model.safetensors")
    assert weights["model.layers.0.mlp.gate_proj.weight"].dtype == torch.float8_e4m3fn
    assert weights["model.layers.0.mlp.gate_proj.weight_scale_inv"].shape == (1, 1)  # [128, 64] in one block
    llm = LLM(str(out), enforce_eager=True, **ENGINE)
    assert "scales per row), from an fp8 checkpoint (block 128x128)" in llm.engine.describe()["quantization"]
    plain = dequantized_copy(str(out), tmp_path / "plain", block=(128, 128))
    prompts = prompts_of(2, seed=5, max_len=20)
    assert greedy(llm, prompts) == hf_greedy(plain, prompts, GREEDY.max_tokens)
