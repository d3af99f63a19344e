"""``fp8_weights.keep_dequantized``: which FP8 projections keep a dequantized copy (by mode and the share of the
weights' bytes the copies would add), that the copy is ``weight_quant.dequantize`` of the weight bit for bit, that
stacked experts never get one, that ``held.linear`` hands it to ``ops.linear`` and that the product stays the same
bit for bit.  Where cuBLAS takes the copy in place of dequantizing: ``test_fp8_matmul_kernel.py``."""
import json
from pathlib import Path

import pytest
import torch

from conftest import build_checkpoint
from nanovllm.kernels import ops, weight_quant
from nanovllm.models.loader import build_model
from nanovllm.quant import fp8_weights, held
from nanovllm.quant.registry import online_scheme

DTYPE = torch.bfloat16


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("moe"), "qwen3_moe", hidden_size=128, intermediate_size=96)


def fp8_model(path):
    hf = json.loads((Path(path) / "config.json").read_text())
    return build_model(hf, dtype=DTYPE, device=torch.device("cpu"), model_dir=path,
                       online=online_scheme("fp8", None, False))


def projections(model):
    return [m for m in model.modules() if held.format_of(m) is held.FP8 and hasattr(m, "weight_scale")]


def kept(model):
    return [m for m in model.modules() if hasattr(m, "weight_dequantized")]


@pytest.mark.parametrize("mode, share, keeps", [("on", 0.0, True), ("off", 100.0, False), ("auto", 0.0, False),
                                                ("auto", 100.0, True)])
def test_the_mode_and_the_share_decide_which_projections_keep_a_copy(moe_checkpoint, monkeypatch, mode, share,
                                                                     keeps):
    monkeypatch.setattr(fp8_weights, "DEQUANTIZED_SHARE", share)
    model = fp8_model(moe_checkpoint)
    count = fp8_weights.keep_dequantized(model, DTYPE, mode)
    assert count == len(kept(model)) == (len(projections(model)) if keeps else 0)
    assert count == 0 or count >= 3 * 2  # qkv and o of each of the 3 layers, and the dense layer's MLP


def test_the_copy_is_the_dequantized_weight_and_experts_keep_none(moe_checkpoint):
    model = fp8_model(moe_checkpoint)
    assert fp8_weights.keep_dequantized(model, DTYPE, "on") == len(projections(model))
    for m in projections(model):
        want = weight_quant.dequantize(m.weight, m.weight_scale, m.quant_group, DTYPE)
        assert m.weight_dequantized.dtype == DTYPE and torch.equal(m.weight_dequantized, want)
        assert "weight_dequantized" not in m.state_dict()  # a working copy, never saved
    experts = [m for m in model.modules() if hasattr(m, "gate_up_proj_scale")]
    assert experts and not any(hasattr(m, "weight_dequantized") for m in experts)


def test_held_linear_hands_the_copy_to_the_op_and_the_product_is_unchanged(moe_checkpoint, monkeypatch):
    model = fp8_model(moe_checkpoint)
    qkv = model.model.layers[0].self_attn.qkv_proj
    x = torch.randn(5, qkv.weight.shape[1], dtype=DTYPE)
    before = held.linear(qkv, x, None)
    fp8_weights.keep_dequantized(model, DTYPE, "on")
    seen = []
    op = ops.linear
    monkeypatch.setattr(ops, "linear", lambda *args: seen.append(args[-1]) or op(*args))
    assert torch.equal(held.linear(qkv, x, None), before)
    assert len(seen) == 1 and seen[0] is qkv.weight_dequantized


def test_a_bad_mode_is_refused_by_name(moe_checkpoint):
    with pytest.raises(ValueError, match="'sometimes'"):
        fp8_weights.keep_dequantized(fp8_model(moe_checkpoint), DTYPE, "sometimes")
