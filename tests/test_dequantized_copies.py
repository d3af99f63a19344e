"""``quant/dequantized.py``: which quantized projections keep a dequantized copy (by mode and the share of the
weights' bytes the copies would add), that the copy is the format's ``dequantize`` bit for bit (FP8, int4), that
stacked experts never get one, that ``held.linear`` hands it to the op, and that the product
stays the same bit for bit; an engine keeps them at start-up, and its graph mode's tokens equal eager's without them.
Where cuBLAS takes the copy in place of dequantizing: ``test_fp8_matmul_kernel.py`` and
``test_int4_kernel.py`` (an act order too: x's columns are permuted, the copy's are not)."""
import json
import random
from pathlib import Path

import pytest
import torch

from conftest import build_checkpoint
from nanovllm.kernels import int4_quant, ops, weight_quant
from nanovllm.models.loader import build_model
from nanovllm.quant import dequantized, held
from nanovllm.quant.int4_checkpoint import quantize_checkpoint_int4
from nanovllm.quant.registry import checkpoint_scheme, online_scheme

DTYPE = torch.bfloat16


@pytest.fixture(scope="module", params=["fp8", "gptq"])
def moe(request, tmp_path_factory):
    """A tiny Qwen3-MoE (sparse, dense, sparse layers) in ``request.param``'s format, built in bf16 on the CPU."""
    path = build_checkpoint(tmp_path_factory.mktemp("moe"), "qwen3_moe", hidden_size=128, intermediate_size=96)
    if request.param != "fp8":
        quantize_checkpoint_int4(path, "gptq", group=32)  # int4 experts too (act order: dequantized)
    return request.param, path


def build(moe):
    form, path = moe
    hf = json.loads((Path(path) / "config.json").read_text())
    scheme = checkpoint_scheme(hf)
    return build_model(hf, dtype=DTYPE, device=torch.device("cpu"), model_dir=path, scheme=scheme,
                       online=online_scheme("fp8" if form == "fp8" else None, scheme, False))


def kept(model):
    return [m for m in model.modules() if hasattr(m, "weight_dequantized")]


@pytest.mark.parametrize("mode, share, keeps", [("on", 0.0, True), ("off", 100.0, False), ("auto", 0.0, False),
                                                ("auto", 100.0, True)])
def test_the_mode_and_the_share_decide_which_projections_keep_a_copy(moe, monkeypatch, mode, share, keeps):
    monkeypatch.setattr(dequantized, "SHARE", share)
    model = build(moe)
    count = dequantized.keep(model, DTYPE, mode)
    assert count == len(kept(model)) == (len(dequantized.projections(model)) if keeps else 0)
    assert count == 0 or count >= 3 * 2 + 2  # qkv and o of each of the 3 layers, and the dense layer's MLP


def test_auto_counts_only_the_weights_on_the_projections_device(moe, monkeypatch):
    """Experts on another device (``offload_experts`` keeps them on the host) leave the share: the copies that fit
    an eighth of the whole model do not fit an eighth of what the device holds."""
    model = build(moe)
    cost = sum(held.format_of(m).dequantized_numel(m) for m in dequantized.projections(model)) * DTYPE.itemsize
    whole = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    monkeypatch.setattr(dequantized, "SHARE", 1.01 * cost / whole)
    experts = [m for m in model.modules() if hasattr(m, "gate_up_proj_scale")]
    for m in experts:  # a stand-in for the host: any other device
        for name, t in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]:
            setattr(m, name, torch.nn.Parameter(t.to("meta"), requires_grad=False) if isinstance(
                t, torch.nn.Parameter) else t.to("meta"))
    assert experts and dequantized.keep(model, DTYPE, "auto") == 0
    assert dequantized.keep(build(moe), DTYPE, "auto") == len(dequantized.projections(model))  # all on one device


def test_the_copy_is_the_dequantized_weight_and_experts_keep_none(moe):
    model = build(moe)
    projections = dequantized.projections(model)
    assert {held.format_of(m).name for m in projections} == {"fp8" if moe[0] == "fp8" else "int4"}
    assert dequantized.keep(model, DTYPE, "on") == len(projections)
    for m in projections:
        if moe[0] == "fp8":
            want = weight_quant.dequantize(m.weight, m.weight_scale, m.quant_group, DTYPE)
        else:
            want = int4_quant.dequantize(m.weight, m.weight_scale, m.weight_zero, m.quant_group, DTYPE)
        assert m.weight_dequantized.dtype == DTYPE and torch.equal(m.weight_dequantized, want)
        assert "weight_dequantized" not in m.state_dict()  # a working copy, never saved
    experts = [m for m in model.modules() if hasattr(m, "gate_up_proj_scale")]
    assert experts and not any(hasattr(m, "weight_dequantized") for m in experts)


def test_held_linear_hands_the_copy_to_the_op_and_the_product_is_unchanged(moe, monkeypatch):
    model = build(moe)
    qkv, down = model.model.layers[0].self_attn.qkv_proj, model.model.layers[1].mlp.down_proj
    xs = [torch.randn(5, m.weight_dequantized.shape[1] if hasattr(m, "weight_dequantized") else
                      held.format_of(m).dequantize(m, DTYPE).shape[1], dtype=DTYPE) for m in (qkv, down)]
    before = [held.linear(m, x, None) for m, x in zip((qkv, down), xs)]
    dequantized.keep(model, DTYPE, "on")
    name = "linear" if moe[0] == "fp8" else "linear_int4"
    seen, op = [], getattr(ops, name)
    monkeypatch.setattr(ops, name, lambda *args: seen.append(args[-1]) or op(*args))
    for m, x, want in zip((qkv, down), xs, before):
        assert torch.equal(held.linear(m, x, None), want)
    assert len(seen) == 2 and seen[0] is qkv.weight_dequantized and seen[1] is down.weight_dequantized


def test_a_bad_mode_is_refused_by_name(moe):
    with pytest.raises(ValueError, match="'sometimes'"):
        dequantized.keep(build(moe), DTYPE, "sometimes")


def test_an_engine_keeps_them_at_start_up_and_its_tokens_do_not_change(moe, monkeypatch):
    """``NANOVLLM_DEQUANTIZED_COPIES=on`` on the CPU (the twins multiply by the copies): graph mode's greedy float32
    tokens equal eager's without the copies."""
    from nanovllm import LLM, SamplingParams
    form, path = moe
    rng = random.Random(3)
    prompts = [[rng.randint(3, 300) for _ in range(rng.randint(20, 40))] for _ in range(4)]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    tokens = {}
    for mode, eager in (("off", True), ("on", False)):
        monkeypatch.setenv("NANOVLLM_DEQUANTIZED_COPIES", mode)
        llm = LLM(path, enforce_eager=eager, quantization="fp8" if form == "fp8" else None, kvcache_block_size=16,
                  num_kvcache_blocks=24, max_model_len=128, max_num_seqs=4, graph_batch_sizes=[4])
        assert bool(kept(llm.engine.runner.model)) == (mode == "on")
        want = sum(m.weight_dequantized.numel() * 4 for m in kept(llm.engine.runner.model))  # float32 copies
        assert llm.engine.describe().get("dequantized_copy_bytes", 0) == want  # bench.py's JSON carries it
        tokens[mode] = [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False)]
        llm.close()
    assert tokens["on"] == tokens["off"]
