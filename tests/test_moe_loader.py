"""Loading MoE checkpoints: per-expert tensors stacked into [E, 2I, H] and [E, H, I] (and a checkpoint already
stacked loads too), a missing expert tensor is an error naming it as the checkpoint does, bad MoE configs are
errors naming the value, and dummy weights fill every expert."""
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import build_checkpoint, make_config
from nanovllm import LLM, SamplingParams
from nanovllm.models.loader import build_model

SMALL = dict(enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=16, max_model_len=64, max_num_seqs=4)


def _model(path):
    config = json.loads((path / "config.json").read_text())
    return build_model(config, dtype=torch.float32, device=torch.device("cpu"), model_dir=str(path))


def _rewrite(path, change):
    """Apply ``change`` to the checkpoint's tensors dict and save it back."""
    tensors = load_file(path / "model.safetensors")
    change(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


@pytest.mark.parametrize("arch,prefix,parts", [
    ("qwen3_moe", "model.layers.2.mlp.experts", ("gate_proj", "up_proj", "down_proj")),
    ("mixtral", "model.layers.1.block_sparse_moe.experts", ("w1", "w3", "w2")),
])
def test_per_expert_tensors_are_stacked_gate_then_up(tmp_path, arch, prefix, parts):
    build_checkpoint(tmp_path, arch)
    tensors = load_file(tmp_path / "model.safetensors")
    experts = dict(_model(tmp_path).named_parameters())
    ours = prefix.replace("block_sparse_moe", "mlp")
    gate_up, down = experts[f"{ours}.gate_up_proj"], experts[f"{ours}.down_proj"]
    for e in range(gate_up.shape[0]):
        gate, up, dn = (tensors[f"{prefix}.{e}.{p}.weight"] for p in parts)
        assert torch.equal(gate_up[e], torch.cat([gate, up])) and torch.equal(down[e], dn)
    assert gate_up.shape == (gate_up.shape[0], 2 * gate.shape[0], gate.shape[1])


@pytest.mark.parametrize("arch,missing", [
    ("qwen3_moe", "model.layers.0.mlp.experts.5.up_proj.weight"),
    ("mixtral", "model.layers.1.block_sparse_moe.experts.2.w2.weight"),
    ("mixtral", "model.layers.0.block_sparse_moe.gate.weight"),
])
def test_a_missing_expert_tensor_is_an_error_that_names_it(tmp_path, arch, missing):
    build_checkpoint(tmp_path, arch)
    _rewrite(tmp_path, lambda t: t.pop(missing))
    with pytest.raises(ValueError, match="lacks tensors the model needs") as err:
        _model(tmp_path)
    assert repr(missing) in str(err.value) and str(err.value).count("experts.") <= 1


def test_an_expert_past_the_configs_count_is_an_error_that_names_it(tmp_path):
    build_checkpoint(tmp_path, "mixtral")
    extra = "model.layers.0.block_sparse_moe.experts.4.w1.weight"
    _rewrite(tmp_path, lambda t: t.update({extra: t["model.layers.0.block_sparse_moe.experts.0.w1.weight"].clone()}))
    with pytest.raises(ValueError, match=rf"{extra}.*expert 4, the model has 4 experts"):
        _model(tmp_path)


def test_a_checkpoint_with_stacked_experts_loads_the_same(tmp_path):
    build_checkpoint(tmp_path / "a", "qwen3_moe")
    stacked_dir = tmp_path / "b"
    stacked_dir.mkdir()
    (stacked_dir / "config.json").write_text((tmp_path / "a" / "config.json").read_text())
    tensors = load_file(tmp_path / "a" / "model.safetensors")
    for layer in (0, 2):
        prefix = f"model.layers.{layer}.mlp.experts"
        pop = [[tensors.pop(f"{prefix}.{e}.{p}.weight") for e in range(8)] for p in ("gate_proj", "up_proj",
                                                                                      "down_proj")]
        tensors[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([g, u]) for g, u in zip(pop[0], pop[1])])
        tensors[f"{prefix}.down_proj"] = torch.stack(pop[2])
    save_file(tensors, stacked_dir / "model.safetensors", metadata={"format": "pt"})
    a = dict(_model(tmp_path / "a").named_parameters())
    b = dict(_model(stacked_dir).named_parameters())
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("change,message", [
    (dict(num_experts_per_tok=9), "num_experts_per_tok=9 exceeds the 8 experts"),
    (dict(num_experts_per_tok=0), "num_experts_per_tok=0 must be a positive int"),
    (dict(decoder_sparse_step=0), "decoder_sparse_step=0 must be a positive int"),
])
def test_bad_moe_config_values_are_errors_that_name_them(tmp_path, change, message):
    config = make_config("qwen3_moe").to_dict()
    config.update(architectures=["Qwen3MoeForCausalLM"], **change)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        LLM(str(tmp_path), load_format="dummy", **SMALL)


@pytest.mark.parametrize("value", [None, 0])
def test_qwen2_moe_without_a_shared_expert_size_is_an_error_that_names_it(tmp_path, value):
    """Not a model without its shared expert: that would ignore the checkpoint's shared-expert tensors."""
    config = make_config("qwen2_moe").to_dict()
    config.update(architectures=["Qwen2MoeForCausalLM"], shared_expert_intermediate_size=value)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=f"shared_expert_intermediate_size={value!r} must be a positive int"):
        LLM(str(tmp_path), load_format="dummy", **SMALL)


@pytest.mark.parametrize("arch,name", [("qwen3_moe", "Qwen3MoeForCausalLM"), ("mixtral", "MixtralForCausalLM")])
def test_dummy_weights_fill_every_expert_and_follow_the_seed(tmp_path, arch, name):
    config = make_config(arch).to_dict()
    config["architectures"] = [name]
    (tmp_path / "config.json").write_text(json.dumps(config))
    a, b = (LLM(str(tmp_path), load_format="dummy", seed=3, **SMALL) for _ in range(2))
    params = dict(a.engine.runner.model.named_parameters())
    stacked = params["model.layers.0.mlp.experts.gate_up_proj"]
    assert all(float(stacked[e].std()) > 0.01 for e in range(stacked.shape[0]))
    assert float(params["model.layers.0.mlp.gate.weight"].std()) > 0.01
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    out = [[o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)] for llm in (a, b)]
    assert out[0] == out[1] and all(len(t) == 4 for t in out[0])


def test_qwen3_30b_a3b_preset_writes_a_config_that_builds_the_real_model(tmp_path):
    """The config bench runs with dummy weights: 30.5B parameters, 3.3B of them active per token."""
    from nanovllm.models.registry import resolve_model_class
    from nanovllm.tools.synthesize import synthesize
    out = synthesize("qwen3-30b-a3b", tmp_path / "cfg", tokenizer=False, config_only=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json"]
    config = json.loads((out / "config.json").read_text())
    with torch.device("meta"):
        model = resolve_model_class(config)(config)
    total = sum(p.numel() for p in model.parameters())
    expert = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    active = total - expert + expert * 8 // 128
    assert round(total / 1e9, 1) == 30.5 and 3.3e9 < active < 3.4e9
    assert all(type(layer.mlp).__name__ == "SparseMoe" for layer in model.model.layers)
