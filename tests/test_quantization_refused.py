"""A quantized checkpoint whose ``quantization_config.quant_method`` is not supported is refused by name when the
``LLM`` is made, before any weight is read, instead of loading its packed weights as if they were unquantized; a
block-FP8 checkpoint (``fp8``) loads, compressed-tensors is checked field by field (``test_fp8_compressed.py``), and
so are GPTQ and AWQ, by ``EngineConfig`` (``quant/registry.py``), before any process starts or weight is read.  Every
registered scheme writes a checkpoint that its own config reads back to it."""
import json
from pathlib import Path

import pytest
import torch

from conftest import build_checkpoint
from nanovllm import LLM
from nanovllm.config import EngineConfig
from nanovllm.kernels import weight_quant
from nanovllm.quant import registry

OPTIONS = dict(enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=8, max_model_len=64)


def _set_quantization(path: str, quantization_config: dict, key: str | None = None) -> None:
    config_path = Path(path) / "config.json"
    config = json.loads(config_path.read_text())
    (config[key] if key else config)["quantization_config"] = quantization_config
    config_path.write_text(json.dumps(config))


def _to_fp8_layout(path: str) -> None:
    """Rewrite the checkpoint as the Qwen3-*-FP8 checkpoints store it: float8 projection weights in 128 x 128 blocks,
    each with its inverse scale in ``weight_scale_inv``."""
    from safetensors.torch import load_file, save_file
    file = Path(path) / "model.safetensors"
    weights = load_file(file)
    for name in [n for n in weights if n.endswith("proj.weight")]:
        w = weights[name]
        scale = w.abs().max().clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
        weights[name] = (w / scale).to(torch.float8_e4m3fn)
        blocks = (-(-w.shape[0] // 128), -(-w.shape[1] // 128))
        weights[name.removesuffix("weight") + "weight_scale_inv"] = torch.full(blocks, float(scale))
    save_file(weights, file, metadata={"format": "pt"})
    _set_quantization(path, {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                             "weight_block_size": [128, 128]})


def test_an_fp8_checkpoint_loads_with_its_weights_in_float8(tmp_path):
    path = build_checkpoint(tmp_path, "qwen3")
    from safetensors.torch import load_file
    plain = load_file(Path(path) / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    _to_fp8_layout(path)
    llm = LLM(path, **OPTIONS)
    assert "scales per row), from an fp8 checkpoint (block 128x128)" in llm.engine.describe()["quantization"]
    down = llm.engine.runner.model.model.layers[0].mlp.down_proj
    assert down.weight.dtype == torch.float8_e4m3fn
    loaded = weight_quant.dequantize(down.weight, down.weight_scale, down.quant_group, torch.float32)
    assert not torch.equal(loaded, plain) and torch.allclose(loaded, plain, rtol=0.07, atol=2e-3)


@pytest.mark.parametrize("method", ["bitsandbytes", "hqq", "some-future-format"])
def test_every_other_quant_method_is_refused_by_name(tmp_path, method):
    path = build_checkpoint(tmp_path, "qwen3")
    _set_quantization(path, {"quant_method": method, "bits": 4})
    with pytest.raises(ValueError, match=rf"quant_method={method!r} is not supported \(supported: fp8, "
                                         rf"compressed-tensors, gptq, awq, mxfp4\)"):
        LLM(path, load_format="dummy", **OPTIONS)


def test_compressed_tensors_other_than_fp8_is_refused_naming_the_field(tmp_path):
    path = build_checkpoint(tmp_path, "qwen3")
    int4 = {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, "symmetric": True}
    _set_quantization(path, {"quant_method": "compressed-tensors", "format": "pack-quantized",
                             "config_groups": {"group_0": {"targets": ["Linear"], "weights": int4}}})
    with pytest.raises(ValueError, match=r"quantization_config.format='pack-quantized' is not supported for "
                                         r"quant_method='compressed-tensors' \(supported: None or "
                                         r"'float-quantized'\)"):
        LLM(path, load_format="dummy", **OPTIONS)


def test_a_quantization_config_without_a_method_is_refused(tmp_path):
    path = build_checkpoint(tmp_path, "qwen3")
    _set_quantization(path, {"bits": 8})
    with pytest.raises(ValueError, match="quant_method=None is not supported"):
        EngineConfig(path, load_format="dummy")


def test_a_vision_language_models_text_config_is_checked_too(tmp_path):
    path = build_checkpoint(tmp_path, "qwen3")
    config_path = Path(path) / "config.json"
    config = json.loads(config_path.read_text())
    config["text_config"] = {"quantization_config": {"quant_method": "bitsandbytes"}}
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quant_method='bitsandbytes'"):
        EngineConfig(path, load_format="dummy")


def test_an_unquantized_checkpoint_still_loads(tmp_path):
    assert EngineConfig(build_checkpoint(tmp_path, "qwen3"), load_format="dummy").hf_config["architectures"]


@pytest.mark.parametrize("quant, message", [
    ({"quant_method": "gptq", "bits": 8, "group_size": 128}, r"quantization_config.bits=8 is not supported for "
                                                              r"quant_method='gptq' \(supported: 4\)"),
    ({"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemv"}, r"version='gemv'"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, r"weight_block_size=\[128\] is not supported"),
])
def test_engine_config_checks_every_schemes_fields_before_any_weight(tmp_path, quant, message):
    path = build_checkpoint(tmp_path, "qwen3")
    (Path(path) / "model.safetensors").unlink()  # nothing to read: the config alone is refused
    _set_quantization(path, quant)
    with pytest.raises(ValueError, match=message):
        EngineConfig(path)


@pytest.mark.parametrize("method", list(registry.CHECKPOINT))
def test_each_registered_scheme_writes_a_checkpoint_its_config_reads_back(tmp_path, method):
    path = build_checkpoint(tmp_path, "qwen3")
    registry.CHECKPOINT[method]().write_checkpoint(path)
    config = EngineConfig(path, **{k: v for k, v in OPTIONS.items() if k != "enforce_eager"})
    assert type(config.quant_scheme) is registry.CHECKPOINT[method] and config.online_scheme is None
    assert type(EngineConfig(path, load_format="dummy").online_scheme) is \
        type(registry.CHECKPOINT[method]().for_dummy_weights())


def test_quantization_fp8_is_refused_on_an_int4_checkpoint_by_name(tmp_path):
    path = build_checkpoint(tmp_path, "qwen3")
    _set_quantization(path, {"quant_method": "gptq", "bits": 4, "group_size": 128})
    with pytest.raises(ValueError, match=r"quantization='fp8' cannot apply to a quant_method='gptq' checkpoint"):
        EngineConfig(path, quantization="fp8")
