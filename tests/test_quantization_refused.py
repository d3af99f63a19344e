"""A quantized checkpoint whose ``quantization_config.quant_method`` is not supported is refused by name when the
``LLM`` is made, before any weight is read, instead of loading its packed weights as if they were unquantized; a
block-FP8 checkpoint (``fp8``) loads, compressed-tensors is checked field by field (``test_fp8_compressed.py``), and
GPTQ and AWQ where the model is built (``test_int4_models.py``)."""
import json
from pathlib import Path

import pytest
import torch

from conftest import build_checkpoint
from nanovllm import LLM
from nanovllm.config import EngineConfig
from nanovllm.kernels import weight_quant

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
                                         rf"compressed-tensors, gptq, awq\)"):
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
