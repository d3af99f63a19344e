"""MXFP4 experts (GPT-OSS's published checkpoints): the decode rule bit for bit transformers' own; a synthesized tiny
MXFP4 GPT-OSS checkpoint (``synthesize --quantize mxfp4``: the published names, shapes and config) that
transformers itself loads to the same experts as our dequantized oracle, read into the held format (uint8 blocks
and e8m0 scales, gate rows then up), giving transformers' greedy float32 tokens on the dequantized weights in eager
and graph mode; the MoE op on MXFP4 experts equal to it on their dequantized weights; dummy weights of such a
config; and the scheme's fields and other formats refused by name.
"""
import json

import pytest
import torch

from conftest import build_checkpoint, hf_greedy, make_config
from nanovllm import LLM, SamplingParams
from nanovllm.kernels import moe_reference, mxfp4_quant, ops
from nanovllm.quant import registry

ENGINE = dict(max_num_seqs=4, kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=160,
              max_num_batched_tokens=48)
PROMPTS = [[5, 9, 33, 100, 7, 8] * 12, [3, 4, 5], list(range(10, 60)), [42]]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_decode_is_transformers_bit_for_bit(dtype):
    """Every byte and every e8m0 scale (0..255: 2^-127 to inf), in each dtype: the same bits, -0.0 and NaN too."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    g = torch.Generator().manual_seed(0)
    blocks = torch.randint(0, 256, (3, 256, 4, 16), dtype=torch.uint8, generator=g)
    scales = torch.arange(256, dtype=torch.uint8)[None, :, None].expand(3, 256, 4).contiguous()
    want = convert_moe_packed_tensors(blocks, scales, dtype=dtype).transpose(1, 2)  # back to [E, rows, cols]
    got = mxfp4_quant.dequantize(blocks.flatten(-2), scales, dtype)
    assert torch.equal(_bits(got), _bits(want.contiguous()))


def test_quantize_round_trips_and_bounds_the_error():
    w = torch.randn(2, 8, 96) * torch.logspace(-3, 2, 8)[None, :, None]
    blocks, scales = mxfp4_quant.quantize(w)
    assert (blocks.shape, scales.shape) == ((2, 8, 48), (2, 8, 3))
    d = mxfp4_quant.dequantize(blocks, scales, torch.float32)
    step = torch.ldexp(torch.ones(scales.shape), scales.int() - 127).repeat_interleave(32, -1)  # half of the widest gap
    assert ((d - w).abs() <= step).all()
    assert torch.equal(mxfp4_quant.dequantize(*mxfp4_quant.quantize(d), torch.float32), d)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    """(MXFP4 checkpoint, its dequantized oracle, eager LLM, graph LLM), written by ``synthesize --quantize mxfp4``."""
    from nanovllm.tools import synthesize
    root = tmp_path_factory.mktemp("mxfp4")
    config = make_config("gpt_oss")
    config.save_pretrained(root / "config")
    path = root / "mxfp4"
    synthesize.main([str(root / "config"), str(path), "--dtype", "float32", "--quantize", "mxfp4", "--seed", "3"])
    _widen(path)
    oracle = registry.write_oracle(path, root / "oracle")
    return (str(path), oracle, LLM(str(path), enforce_eager=True, **ENGINE),
            LLM(str(path), graph_batch_sizes=[1, 2, 4], **ENGINE))


def _widen(path) -> None:
    """N(0, 0.02) weights leave a tiny model's tokens flat: scale the plain weights up, as conftest draws them."""
    import safetensors.torch as st
    tensors = st.load_file(path / "model.safetensors")
    tensors = {k: v * 4 if v.is_floating_point() and "norm" not in k else v for k, v in tensors.items()}
    st.save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_checkpoint_has_the_published_layout(engines):
    """Names, shapes, dtypes and config of the published checkpoints; transformers' own MXFP4 loading (dequantized
    on the CPU) reads it to exactly the oracle's experts."""
    import transformers
    from safetensors import safe_open
    path, oracle, _, _ = engines
    cfg = json.loads(open(f"{path}/config.json").read())
    assert cfg["quantization_config"]["quant_method"] == "mxfp4"
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        x = "model.layers.1.mlp.experts."
        shapes = {k[len(x):]: (f.get_slice(k).get_shape(), f.get_slice(k).get_dtype()) for k in f.keys()
                  if k.startswith(x)}
    assert shapes == {"gate_up_proj_blocks": ([4, 64, 2, 16], "U8"), "gate_up_proj_scales": ([4, 64, 2], "U8"),
                      "down_proj_blocks": ([4, 64, 1, 16], "U8"), "down_proj_scales": ([4, 64, 1], "U8"),
                      "gate_up_proj_bias": ([4, 64], "F32"), "down_proj_bias": ([4, 64], "F32")}
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True))
    plain = transformers.AutoModelForCausalLM.from_pretrained(oracle, dtype=torch.float32)
    for a, b in zip(theirs.model.layers, plain.model.layers):
        assert torch.equal(a.mlp.experts.gate_up_proj, b.mlp.experts.gate_up_proj)
        assert torch.equal(a.mlp.experts.down_proj, b.mlp.experts.down_proj)


def test_experts_are_held_in_mxfp4(engines):
    """uint8 blocks and e8m0 scales, gate rows then up (the checkpoint interleaves them), dequantizing to the
    oracle's experts in our layout; the start-up line says so."""
    import transformers
    path, oracle, eager, _ = engines
    ours = eager.engine.runner.model.model.layers[1].mlp.experts
    hf = transformers.AutoModelForCausalLM.from_pretrained(oracle, dtype=torch.float32).model.layers[1].mlp.experts
    assert (ours.gate_up_proj.dtype, ours.gate_up_proj_scale.dtype) == (torch.uint8, torch.uint8)
    assert (tuple(ours.gate_up_proj.shape), tuple(ours.down_proj_scale.shape)) == ((4, 64, 32), (4, 64, 1))
    w13 = mxfp4_quant.dequantize(ours.gate_up_proj, ours.gate_up_proj_scale, torch.float32)
    assert torch.equal(w13, torch.cat([hf.gate_up_proj[..., ::2], hf.gate_up_proj[..., 1::2]], -1).transpose(1, 2))
    w2 = mxfp4_quant.dequantize(ours.down_proj, ours.down_proj_scale, torch.float32)
    assert torch.equal(w2, hf.down_proj.transpose(1, 2))
    from nanovllm.quant.mxfp4_schemes import Mxfp4
    assert Mxfp4().describe(eager.engine.runner.model) == "MXFP4 experts (8 of 8 expert stacks)"


def test_greedy_tokens_match_transformers_on_the_dequantized_weights(engines):
    path, oracle, eager, graph = engines
    lengths = [12, 5, 9, 16]
    want = [w[:n] for w, n in zip(hf_greedy(oracle, PROMPTS, max(lengths)), lengths)]
    assert len({tuple(w) for w in want}) > 1 and any(len(set(w)) > 2 for w in want)  # not a flat model
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    assert [o["token_ids"] for o in eager.generate(PROMPTS, params, use_tqdm=False)] == want
    with torch.compiler.set_stance("fail_on_recompile"):
        assert [o["token_ids"] for o in graph.generate(PROMPTS, params, use_tqdm=False)] == want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_op_on_mxfp4_experts_is_the_op_on_their_dequantized_weights(dtype):
    g = torch.Generator().manual_seed(1)
    e, hidden, inter, tokens = 4, 64, 32, 7
    w13, s13 = mxfp4_quant.quantize(torch.randn(e, 2 * inter, hidden, generator=g) * 0.1)
    w2, s2 = mxfp4_quant.quantize(torch.randn(e, hidden, inter, generator=g) * 0.1)
    x = torch.randn(tokens, hidden, generator=g).to(dtype)
    logits = torch.randn(tokens, e, generator=g)
    bias = dict(w13_bias=torch.randn(e, 2 * inter, generator=g), w2_bias=torch.randn(e, hidden, generator=g),
                activation="swiglu_oss", swiglu_limit=1.0)
    got = ops.fused_moe(x, logits, w13, w2, 2, True, s13, s2, 32, **bias)
    plain = [mxfp4_quant.dequantize(w, s, dtype) for w, s in ((w13, s13), (w2, s2))]
    assert torch.equal(got, moe_reference.fused_moe_reference(x, logits, *plain, 2, True, **bias))


def test_dummy_weights_of_an_mxfp4_config_are_mxfp4_drawn_an_expert_at_a_time(engines, monkeypatch):
    """Dummy MXFP4 experts are drawn and quantized one expert at a time (GPT-OSS-120B's stacks are 234 GB in bf16)."""
    path, quantized = engines[0], []
    real = mxfp4_quant.quantize
    monkeypatch.setattr(mxfp4_quant, "quantize", lambda w: quantized.append(tuple(w.shape)) or real(w))
    llm = LLM(path, enforce_eager=True, load_format="dummy", **ENGINE)
    ex = llm.engine.runner.model.model.layers[0].mlp.experts
    assert ex.gate_up_proj.dtype == ex.down_proj_scale.dtype == torch.uint8
    assert quantized and all(len(shape) == 2 for shape in quantized)
    out = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0]["token_ids"]) == 3


def test_fields_and_other_formats_are_refused_by_name(tmp_path):
    path = build_checkpoint(tmp_path, "gpt_oss")
    cfg = json.loads((tmp_path / "config.json").read_text())
    for quant, match in (({"quant_method": "mxfp4", "dequantize": True}, "dequantize=True is not supported"),
                         ({"quant_method": "mxfp4", "block_size": 16}, "block_size=16 is not supported"),
                         ({"quant_method": "nvfp4"}, "quant_method='nvfp4' is not supported.*mxfp4")):
        (tmp_path / "config.json").write_text(json.dumps(dict(cfg, quantization_config=quant)))
        with pytest.raises(ValueError, match=match):
            LLM(path, enforce_eager=True, **ENGINE)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    from nanovllm.tools import synthesize
    make_config("qwen3").save_pretrained(tmp_path / "qwen")
    with pytest.raises(ValueError, match="writes GPT-OSS's MXFP4 experts"):
        synthesize.synthesize(str(tmp_path / "qwen"), tmp_path / "q", quantize="mxfp4")
