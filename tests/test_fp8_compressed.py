"""compressed-tensors FP8 checkpoints (llm-compressor's layout: float8 weights, a ``weight_scale`` per channel or per
tensor) load as stored: the projections and experts stay float8 in memory with one scale per row, and greedy float32
tokens equal transformers' on the dequantized weights (``fp8_oracle``; MoE experts W8A8, ``w8a8_oracle``), in eager
and graph mode, dense and MoE, at one rank and two; ``synthesize --quantize compressed-fp8`` writes one; a config
this engine cannot honour (static input scales, 4 bits, integers, ...) is refused naming the field."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_checkpoint, hf_greedy
from nanovllm import LLM
from nanovllm.quant import fp8_checkpoint
from nanovllm.quant.compressed_tensors import ChannelLayout
from nanovllm.quant import registry
from test_fp8_checkpoints import ENGINE, GREEDY, greedy, prompts_of, refused_without_scale


def compressed_checkpoint(tmp_path: Path, arch: str, strategy: str = "channel") -> str:
    path = build_checkpoint(tmp_path / arch, arch)
    fp8_checkpoint.quantize_checkpoint(path, ChannelLayout(strategy))  # what synthesize --quantize writes with
    return path


def oracle(path: str, out: Path) -> str:
    return registry.write_oracle(path, out)


@pytest.fixture(scope="module", params=[("qwen3", "channel"), pytest.param(("qwen3", "tensor"), marks=pytest.mark.slow),
                                        pytest.param(("llama", "channel"), marks=pytest.mark.slow),
                                        pytest.param(("qwen3_moe", "channel"), marks=pytest.mark.slow),
                                        pytest.param(("mixtral", "tensor"), marks=pytest.mark.slow)],
                ids=lambda p: "-".join(p))
def quantized(request, tmp_path_factory):
    arch, strategy = request.param
    tmp = tmp_path_factory.mktemp(f"{arch}-{strategy}")
    path = compressed_checkpoint(tmp, arch, strategy)
    return path, oracle(path, tmp / "dequantized"), strategy


def test_the_checkpoint_is_stored_in_the_compressed_tensors_layout(quantized):
    path, _, strategy = quantized
    weights = load_file(f"{path}/model.safetensors")
    fp8 = [n for n, t in weights.items() if t.dtype == torch.float8_e4m3fn]
    assert fp8 and all(n.endswith(("proj.weight", "w1.weight", "w2.weight", "w3.weight")) for n in fp8)
    for name in fp8:
        scale = weights[name + "_scale"]
        assert scale.dtype == torch.float32
        assert scale.shape == ((weights[name].shape[0], 1) if strategy == "channel" else (1,))
    assert {"model.embed_tokens.weight", "lm_head.weight"}.isdisjoint(fp8)
    quant = json.loads(Path(path, "config.json").read_text())["quantization_config"]
    assert quant["quant_method"] == "compressed-tensors" and quant["format"] == "float-quantized"
    assert quant["config_groups"]["group_0"]["weights"]["strategy"] == strategy
    assert quant["ignore"] == ["lm_head"]


def test_eager_and_graph_match_transformers_on_the_dequantized_weights(quantized):
    path, plain, strategy = quantized
    prompts = prompts_of(5, seed=11, max_len=40)
    want = hf_greedy(plain, prompts, GREEDY.max_tokens, w8a8=True)
    eager = LLM(path, enforce_eager=True, **ENGINE)
    assert eager.engine.describe()["quantization"].startswith("fp8 weights (")
    layer = eager.engine.runner.model.model.layers[0]
    qkv = layer.self_attn.qkv_proj
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.weight_scale.shape == (qkv.weight.shape[0], 1)
    assert qkv.quant_group == qkv.weight.shape[1]  # one scale per row over all its columns
    experts = getattr(layer.mlp, "experts", None)
    if experts is not None:  # the stacks: float8, a scale per expert and row, one group over both stacks' columns
        for stack in (experts.gate_up_proj, experts.down_proj):
            assert stack.dtype == torch.float8_e4m3fn
        assert experts.gate_up_proj_scale.shape == (*experts.gate_up_proj.shape[:2], 1)
        assert experts.down_proj_scale.shape == (*experts.down_proj.shape[:2], 1)
        assert experts.quant_group == max(experts.gate_up_proj.shape[2], experts.down_proj.shape[2])
    assert greedy(eager, prompts) == want
    graph = LLM(path, **ENGINE)
    assert graph.engine.runner.mode == "graph"
    assert greedy(graph, prompts) == want


def test_a_per_tensor_scale_becomes_each_packed_parts_rows_scale(tmp_path):
    path = compressed_checkpoint(tmp_path, "qwen3", "tensor")
    weights = load_file(f"{path}/model.safetensors")
    name = "model.layers.1.self_attn.k_proj.weight_scale"
    weights[name] = weights[name].reshape(())  # some writers store a per-tensor scale 0-d
    save_file(weights, f"{path}/model.safetensors", metadata={"format": "pt"})
    llm = LLM(path, enforce_eager=True, **ENGINE)
    qkv = llm.engine.runner.model.model.layers[1].self_attn.qkv_proj
    parts = [weights[f"model.layers.1.self_attn.{p}_proj.weight_scale"] for p in "qkv"]
    want = torch.cat([s.expand(weights[f"model.layers.1.self_attn.{p}_proj.weight"].shape[0]) for s, p in
                      zip(parts, "qkv")])
    assert len({float(s) for s in parts}) == 3 and torch.equal(qkv.weight_scale[:, 0], want)


def test_the_start_up_line_names_the_layout(quantized):
    path, _, strategy = quantized
    scheme = registry.checkpoint_scheme(json.loads(Path(path, "config.json").read_text()))
    plain = build_checkpoint(Path(path).parent / "plain", "qwen3")
    with LLM(plain, enforce_eager=True, **ENGINE) as llm:  # no FP8 weight kept: all dequantized at load
        assert scheme.describe(llm.engine.runner.model) == \
            f"fp8 checkpoint (compressed-tensors, per {strategy}), dequantized at load"
    with LLM(path, enforce_eager=True, **ENGINE) as llm:
        assert llm.engine.describe()["quantization"].endswith(
            f"projections and expert stacks, scales per row), from an fp8 checkpoint (compressed-tensors, per "
            f"{strategy})")


def test_scales_follow_a_row_shard_and_stay_whole_over_a_column_shard():
    class Stored:  # a safetensors slice of the scales
        def __init__(self, t):
            self.t = t

        def get_shape(self):
            return list(self.t.shape)

        def __getitem__(self, index):
            return self.t[index]

    layout = ChannelLayout()
    channel = torch.arange(6, dtype=torch.float32).reshape(6, 1)
    assert layout.scale_piece("w", (6, 8), Stored(channel), (0, 2, 4)).flatten().tolist() == [2.0, 3.0]
    assert torch.equal(layout.scale_piece("w", (6, 8), Stored(channel), (1, 4, 8)), channel)
    assert layout.scale_piece("w", (6, 8), Stored(torch.tensor([0.5])), (0, 3, 6)).flatten().tolist() == [0.5] * 3
    assert layout.scale_piece("w", (6, 8), Stored(torch.tensor(0.25)), None).shape == (6, 1)
    with pytest.raises(ValueError, match=r"'w_scale' has shape \(3, 1\); 'w' of shape \(6, 8\) needs \(6, 1\)"):
        layout.scale_piece("w", (6, 8), Stored(torch.ones(3, 1)), None)


def test_a_float8_weight_without_its_scale_is_refused_by_name(tmp_path):
    refused_without_scale(compressed_checkpoint(tmp_path, "qwen3"), "model.layers.1.mlp.down_proj.weight",
                          "model.layers.1.mlp.down_proj.weight_scale")


def test_dummy_weights_of_a_compressed_config_run_in_fp8(tmp_path):
    path = compressed_checkpoint(tmp_path, "qwen3")
    llm = LLM(path, load_format="dummy", enforce_eager=True, **ENGINE)
    assert llm.engine.runner.model.model.layers[0].mlp.down_proj.weight.dtype == torch.float8_e4m3fn


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_synthesize_writes_a_compressed_checkpoint_that_loads(tmp_path, arch):
    from nanovllm.tools import synthesize
    config = build_checkpoint(tmp_path / "src", arch) + "/config.json"
    out = tmp_path / "compressed"
    synthesize.main([config, str(out), "--dtype", "float32", "--quantize", "compressed-fp8"])
    weights = load_file(f"{out}/model.safetensors")
    assert weights["model.layers.0.mlp.gate_proj.weight"].dtype == torch.float8_e4m3fn
    assert weights["model.layers.0.mlp.gate_proj.weight_scale"].shape == (128, 1)
    llm = LLM(str(out), enforce_eager=True, **ENGINE)
    prompts = prompts_of(2, seed=12, max_len=20)
    assert greedy(llm, prompts) == hf_greedy(oracle(str(out), tmp_path / "plain"), prompts, GREEDY.max_tokens)


@pytest.mark.slow
def test_two_ranks_equal_one(tmp_path):
    path = compressed_checkpoint(tmp_path, "qwen3")  # o_proj and down_proj split by columns, the rest by rows
    prompts = prompts_of(4, seed=13, max_len=30)
    one = greedy(LLM(path, enforce_eager=True, **ENGINE), prompts)
    assert one == hf_greedy(oracle(path, tmp_path / "plain"), prompts, GREEDY.max_tokens)
    two = LLM(path, tensor_parallel_size=2, enforce_eager=True, **ENGINE)
    try:
        assert greedy(two, prompts) == one
    finally:
        two.close()


@pytest.mark.parametrize("field,value", [
    ("input_activations.dynamic", False), ("weights.num_bits", 4), ("weights.type", "int"),
    ("weights.strategy", "group"), ("weights.symmetric", False), ("output_activations", {"num_bits": 8})])
def test_a_config_the_engine_cannot_honour_is_refused_naming_the_field(tmp_path, field, value):
    path = compressed_checkpoint(tmp_path, "qwen3")
    config_path = Path(path, "config.json")
    config = json.loads(config_path.read_text())
    part, _, key = field.partition(".")
    group = config["quantization_config"]["config_groups"]["group_0"]
    if key:
        group[part][key] = value
    else:
        group[part] = value
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=rf"quantization_config\.config_groups\.group_0\.{field}={value!r} is not "
                                         rf"supported for quant_method='compressed-tensors'".replace("{", r"\{")):
        LLM(path, enforce_eager=True, **ENGINE)
