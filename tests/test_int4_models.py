"""GPTQ and AWQ checkpoints of dense and MoE models (Qwen3, Llama, Qwen3-MoE, Mixtral) load with projections and
routed experts in int4, run by ``linear_int4`` and ``fused_moe``: greedy float32 tokens equal transformers' on the
dequantized weights (``quant/int4_oracle.py``) for GPTQ sym with a partial last group, asym, one group per row and
desc_act, and AWQ; graph mode equals eager; two ranks equal one; act-ordered experts and a packed projection whose
parts differ in act order are dequantized at load and still match; desc_act with two ranks, a group a shard would cut,
an unsupported field and ``quantization="fp8"`` are refused by name; dummy weights and offloaded experts run int4."""
import json
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import build_checkpoint, hf_greedy
from nanovllm import LLM, SamplingParams
from nanovllm.config import EngineConfig
from nanovllm.quant import held
from nanovllm.quant import int4_weights
from nanovllm.quant.int4_checkpoint import quantize_checkpoint_int4
from nanovllm.quant.registry import write_oracle

ENGINE = dict(kvcache_block_size=16, num_kvcache_blocks=32, max_model_len=128, max_num_seqs=4,
              graph_batch_sizes=[1, 2, 4])
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
# name: (architecture, quantize_checkpoint_int4's options, build_checkpoint's overrides).  An intermediate size of
# 112 gives down_proj a partial last group (3 x 32 + 16 columns).
LAYOUTS = {
    "gptq-sym-partial-group": ("qwen3", dict(method="gptq", group=32), dict(intermediate_size=112)),
    "gptq-asym": ("llama", dict(method="gptq", group=32, sym=False), {}),
    "gptq-whole-rows": ("qwen3", dict(method="gptq", group=-1), {}),
    "gptq-desc-act": ("llama", dict(method="gptq", group=32, desc_act=True), {}),
    "awq-partial-group": ("qwen3", dict(method="awq", group=32), dict(intermediate_size=112)),
}


def prompts_of(n, seed, max_len):
    rng = random.Random(seed)
    return [[rng.randint(3, 383) for _ in range(rng.randint(1, max_len))] for _ in range(n)]


def greedy(llm, prompts):
    return [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def int4_checkpoint(tmp_path: Path, layout: str) -> str:
    arch, quantize, overrides = LAYOUTS[layout]
    path = build_checkpoint(tmp_path / layout, arch, **overrides)
    quantize_checkpoint_int4(path, **quantize)
    return path


@pytest.fixture(scope="module", params=list(LAYOUTS))
def quantized(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    path = int4_checkpoint(tmp, request.param)
    return request.param, path, write_oracle(path, tmp / "dequantized")


def test_eager_matches_transformers_on_the_dequantized_weights(quantized):
    layout, path, plain = quantized
    prompts = prompts_of(5, seed=1, max_len=40)
    llm = LLM(path, enforce_eager=True, **ENGINE)
    model = llm.engine.runner.model
    quantize = LAYOUTS[layout][1]
    group = "whole rows" if quantize["group"] == -1 else f"group {quantize['group']}"
    assert int4_weights.describe(model) == (f"int4 weights (8 of 8 projections and expert stacks, "
                                            f"{quantize['method']}, {group})")
    assert llm.engine.describe()["quantization"] == int4_weights.describe(model)  # the start-up line says it
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    for linear in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj):
        assert held.format_of(linear) is held.INT4 and linear.weight.dtype == torch.uint8
        assert (linear.weight_perm is not None) == quantize.get("desc_act", False)
    assert greedy(llm, prompts) == hf_greedy(plain, prompts, GREEDY.max_tokens)


def test_the_oracle_differs_from_the_unquantized_weights(tmp_path):
    """The dequantized weights change the tokens, so matching them says the int4 values were used."""
    original = build_checkpoint(tmp_path / "plain", "qwen3")
    path = shutil.copytree(original, tmp_path / "gptq")
    quantize_checkpoint_int4(path, "gptq", group=32)
    oracle = write_oracle(path, tmp_path / "dequantized")
    prompts = prompts_of(5, seed=1, max_len=40)
    assert hf_greedy(oracle, prompts, GREEDY.max_tokens) != hf_greedy(original, prompts, GREEDY.max_tokens)
    before = load_file(f"{original}/model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    after = load_file(f"{oracle}/model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    step = before.abs().amax() / 7.5  # one quantization step of the widest group
    assert not torch.equal(before, after) and (before - after).abs().max() <= 0.6 * step


def test_graph_mode_equals_eager(tmp_path):
    path = int4_checkpoint(tmp_path, "gptq-desc-act")  # act order: x's columns gathered inside the graph
    prompts = prompts_of(4, seed=2, max_len=30)
    eager = greedy(LLM(path, enforce_eager=True, **ENGINE), prompts)
    graph = LLM(path, **ENGINE)
    assert graph.engine.runner.mode == "graph"
    assert greedy(graph, prompts) == eager


def test_modules_to_not_convert_stay_in_the_model_dtype(tmp_path):
    path = build_checkpoint(tmp_path / "qwen3", "qwen3")
    quantize_checkpoint_int4(path, "awq", group=32, skip=["layers.1.mlp"])
    llm = LLM(path, enforce_eager=True, **ENGINE)
    layers = llm.engine.runner.model.model.layers
    assert held.format_of(layers[0].mlp.down_proj) is held.INT4 and held.format_of(layers[1].mlp.down_proj) is None
    assert layers[1].mlp.gate_up_proj.weight.dtype == torch.float32
    assert int4_weights.describe(llm.engine.runner.model) == ("int4 weights (6 of 8 projections and expert stacks, "
                                                              "awq, group 32)")
    prompts = prompts_of(3, seed=3, max_len=20)
    plain = write_oracle(path, tmp_path / "plain")
    assert greedy(llm, prompts) == hf_greedy(plain, prompts, GREEDY.max_tokens)


@pytest.mark.slow
def test_two_ranks_equal_one(tmp_path):
    path = int4_checkpoint(tmp_path, "gptq-asym")  # 128 and 64 columns: each rank's shard whole groups of 32
    prompts = prompts_of(4, seed=4, max_len=30)
    one = greedy(LLM(path, enforce_eager=True, **ENGINE), prompts)
    with LLM(path, tensor_parallel_size=2, enforce_eager=True, **ENGINE) as two:
        assert greedy(two, prompts) == one


def test_desc_act_with_two_ranks_is_refused_naming_it(tmp_path):
    path = int4_checkpoint(tmp_path, "gptq-desc-act")
    with pytest.raises(ValueError, match=r"quantization_config.desc_act=True .* tensor_parallel_size=2"):
        LLM(path, tensor_parallel_size=2, enforce_eager=True, **ENGINE)


def test_a_shard_that_cuts_a_group_is_refused_naming_the_layer_group_and_shard(tmp_path):
    path = int4_checkpoint(tmp_path, "gptq-sym-partial-group")  # down_proj's 112 columns: 56 is not 32k
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.mlp.down_proj': int4 group_size 32 does not divide "
                                         r"this tensor-parallel rank's shard, input columns (0:56|56:112) of 112"):
        LLM(path, tensor_parallel_size=2, enforce_eager=True, **ENGINE)


def _set_field(path: str, field: str, value) -> None:
    config_path = Path(path, "config.json")
    config = json.loads(config_path.read_text())
    config["quantization_config"][field] = value
    config_path.write_text(json.dumps(config))


@pytest.mark.parametrize("method,field,value", [("gptq", "bits", 8), ("awq", "version", "gemv"),
                                                ("gptq", "checkpoint_format", "marlin")])
def test_an_unsupported_field_is_refused_by_name(tmp_path, method, field, value):
    path = build_checkpoint(tmp_path / "qwen3", "qwen3")
    quantize_checkpoint_int4(path, method, group=32)
    _set_field(path, field, value)
    with pytest.raises(ValueError, match=re.escape(f"quantization_config.{field}={value!r} is not supported for "
                                                   f"quant_method={method!r}")):
        LLM(path, enforce_eager=True, **ENGINE)


def test_fp8_quantization_of_an_int4_checkpoint_is_refused_naming_both(tmp_path):
    path = int4_checkpoint(tmp_path, "gptq-asym")
    with pytest.raises(ValueError, match=r"quantization='fp8' cannot apply to a quant_method='gptq' checkpoint"):
        LLM(path, quantization="fp8", **ENGINE)


def test_dummy_weights_of_an_int4_config_run_in_int4(tmp_path):
    path = int4_checkpoint(tmp_path, "awq-partial-group")
    assert EngineConfig(path).online_quantization is None  # read as stored
    assert EngineConfig(path, load_format="dummy").online_quantization == "awq"  # not "fp8"
    llm = LLM(path, load_format="dummy", enforce_eager=True, **ENGINE)
    model = llm.engine.runner.model
    assert int4_weights.describe(model) == "int4 weights (8 of 8 projections and expert stacks, awq, group 32)"
    down = model.model.layers[0].mlp.down_proj
    assert down.weight.dtype == torch.uint8 and down.weight_scale.shape == (64, 4)  # 112 columns: 3 x 32 + 16
    assert all(len(t) == GREEDY.max_tokens for t in greedy(llm, prompts_of(2, seed=5, max_len=20)))


# name: (architecture, quantize_checkpoint_int4's options, projections and expert stacks).  Mixtral's experts
# (block_sparse_moe's w1/w3/w2) have I = 48: a partial last group of down's columns.
MOE_LAYOUTS = {
    "qwen3_moe-gptq": ("qwen3_moe", dict(method="gptq", group=32), 12),
    "mixtral-awq": ("mixtral", dict(method="awq", group=32), 8),
}


@pytest.fixture(scope="module", params=list(MOE_LAYOUTS))
def moe_quantized(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(request.param)
    path = moe_checkpoint(tmp, *MOE_LAYOUTS[request.param][:1], **MOE_LAYOUTS[request.param][1])
    return request.param, path, write_oracle(path, tmp / "dequantized")


def moe_checkpoint(tmp_path: Path, arch: str, method: str, **quantize) -> str:
    path = build_checkpoint(tmp_path / arch, arch)
    quantize_checkpoint_int4(path, method, **quantize)
    return path


def _assert_int4_experts(experts, group: int) -> None:
    num_experts, two_i, half_h = experts.gate_up_proj.shape
    hidden, inter = half_h * 2, two_i // 2
    assert experts.down_proj.shape == (num_experts, hidden, inter // 2) and experts.quant_group == group
    for attr, (rows, k) in (("gate_up_proj", (two_i, hidden)), ("down_proj", (hidden, inter))):
        assert held.format_of(experts) is held.INT4 and getattr(experts, attr).dtype == torch.uint8
        scale, zero = getattr(experts, f"{attr}_scale"), getattr(experts, f"{attr}_zero")
        assert scale.dtype == torch.float16 and scale.shape == zero.shape == (num_experts, rows, -(-k // group))


@pytest.mark.slow
def test_moe_routed_experts_stay_int4_and_match_transformers(moe_quantized):
    layout, path, plain = moe_quantized
    assert re.search(r"\.experts\.\d+\.(down_proj|w2)\.qweight", " ".join(load_file(f"{path}/model.safetensors")))
    llm = LLM(path, enforce_eager=True, **ENGINE)
    model = llm.engine.runner.model
    _, quantize, count = MOE_LAYOUTS[layout]
    assert int4_weights.describe(model) == (f"int4 weights ({count} of {count} projections and expert stacks, "
                                            f"{quantize['method']}, group 32)")
    _assert_int4_experts(model.model.layers[0].mlp.experts, 32)
    prompts = prompts_of(4, seed=6, max_len=30)
    assert greedy(llm, prompts) == hf_greedy(plain, prompts, GREEDY.max_tokens)


@pytest.mark.slow
def test_moe_graph_mode_equals_eager(tmp_path):
    path = moe_checkpoint(tmp_path, "qwen3_moe", "gptq", group=-1, sym=False)  # one group of max(H, I) for both
    prompts = prompts_of(4, seed=8, max_len=30)
    eager = LLM(path, enforce_eager=True, **ENGINE)
    _assert_int4_experts(eager.engine.runner.model.model.layers[0].mlp.experts, 64)
    graph = LLM(path, **ENGINE)
    assert graph.engine.runner.mode == "graph"
    assert greedy(graph, prompts) == greedy(eager, prompts)


@pytest.mark.slow
def test_moe_experts_with_an_act_order_are_dequantized_and_still_match(tmp_path):
    """desc_act gives each expert its own column order, which the fused MoE op cannot gather: those experts are
    dequantized at load, the projections stay int4."""
    path = moe_checkpoint(tmp_path, "qwen3_moe", "gptq", group=32, desc_act=True)
    llm = LLM(path, enforce_eager=True, **ENGINE)
    model = llm.engine.runner.model
    assert int4_weights.describe(model) == ("int4 weights (8 of 12 projections and expert stacks, gptq, group 32); "
                                            "4 routed expert stacks dequantized at load (GPTQ act orders, or parts "
                                            "mixing int4 and plain weights)")
    assert model.model.layers[0].mlp.experts.down_proj.dtype == torch.float32
    prompts = prompts_of(3, seed=9, max_len=30)
    plain = write_oracle(path, tmp_path / "plain")
    assert greedy(llm, prompts) == hf_greedy(plain, prompts, GREEDY.max_tokens)


def test_dummy_int4_moe_weights_run_with_int4_experts(tmp_path):
    path = moe_checkpoint(tmp_path, "qwen3_moe", "gptq", group=32)
    llm = LLM(path, load_format="dummy", enforce_eager=True, **ENGINE)
    model = llm.engine.runner.model
    assert int4_weights.describe(model) == "int4 weights (12 of 12 projections and expert stacks, gptq, group 32)"
    _assert_int4_experts(model.model.layers[2].mlp.experts, 32)
    assert all(len(t) == GREEDY.max_tokens for t in greedy(llm, prompts_of(2, seed=5, max_len=20)))


def test_offloading_int4_experts_changes_no_token(tmp_path):  # the slots' int4 layout: test_int4_offload.py
    path, prompts = moe_checkpoint(tmp_path, "qwen3_moe", "awq", group=32), prompts_of(3, seed=4, max_len=20)
    llm = LLM(path, offload_experts=True, experts_on_device=1, enforce_eager=True, **ENGINE)
    assert greedy(llm, prompts) == greedy(LLM(path, enforce_eager=True, **ENGINE), prompts)


def test_q_k_v_of_different_act_orders_are_dequantized_and_still_match(tmp_path):
    """GPTQ gives q, k and v one act order (one input); a checkpoint where they differ cannot share one
    permutation of x, so that packed projection is dequantized at load."""
    from safetensors.torch import save_file
    from nanovllm.quant.int4_checkpoint import quantize_linear
    path = build_checkpoint(tmp_path / "llama", "llama")
    k_proj = load_file(f"{path}/model.safetensors")["model.layers.0.self_attn.k_proj.weight"]
    quantize_checkpoint_int4(path, "gptq", group=32, desc_act=True)
    weights = load_file(f"{path}/model.safetensors")
    stored = quantize_linear(k_proj, "gptq", 32, True, torch.Generator().manual_seed(99))
    weights.update((f"model.layers.0.self_attn.k_proj.{suffix}", t) for suffix, t in stored.items())
    save_file(weights, f"{path}/model.safetensors", metadata={"format": "pt"})
    llm = LLM(path, enforce_eager=True, **ENGINE)
    model = llm.engine.runner.model
    assert int4_weights.describe(model) == ("int4 weights (7 of 8 projections and expert stacks, gptq, group 32); 1 "
                                            "projection dequantized at load (their parts mix int4 and plain weights "
                                            "or act orders)")
    assert model.model.layers[0].self_attn.qkv_proj.weight.dtype == torch.float32
    prompts = prompts_of(3, seed=7, max_len=30)
    plain = write_oracle(path, tmp_path / "plain")
    assert greedy(llm, prompts) == hf_greedy(plain, prompts, GREEDY.max_tokens)


@pytest.mark.slow
def test_moe_two_ranks_equal_one(tmp_path):
    """Experts' gate/up split by rows, down by columns: each rank's 16 of I = 32 lie inside one group of 32."""
    path = moe_checkpoint(tmp_path, "qwen3_moe", "awq", group=32)
    prompts = prompts_of(4, seed=10, max_len=30)
    one = greedy(LLM(path, enforce_eager=True, **ENGINE), prompts)
    with LLM(path, tensor_parallel_size=2, enforce_eager=True, **ENGINE) as two:
        assert greedy(two, prompts) == one


def test_an_expert_shard_that_cuts_a_group_is_refused_naming_the_layer(tmp_path):
    path = moe_checkpoint(tmp_path, "mixtral", "gptq", group=16)  # I = 48: each rank's 24 columns cut a group
    with pytest.raises(ValueError, match=r"layer 'model.layers.0.block_sparse_moe.experts.\d+.w2': int4 group_size "
                                         r"16 does not divide this tensor-parallel rank's shard, input columns "
                                         r"(0:24|24:48) of 48"):
        LLM(path, tensor_parallel_size=2, enforce_eager=True, **ENGINE)
