"""Bad input raises a clear TypeError/ValueError before any work, and the engine stays usable."""
import pytest

from conftest import build_checkpoint
from nanovllm import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("bad"), "qwen3")
    return LLM(path, enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=64)


@pytest.mark.parametrize("prompts, params, error, words", [
    ([[]], None, ValueError, "empty"),
    ([[1] * 65], None, ValueError, "max_model_len=64"),
    ([[1, 384]], None, ValueError, "384 outside the vocabulary"),
    ([[1, -1]], None, ValueError, "-1 outside"),
    ([[1], [2]], [SamplingParams()], ValueError, "2 prompts but 1 sampling_params"),
    (42, None, TypeError, "prompts must be"),
    ([[1.5]], None, TypeError, "list of int"),
    ([{"a": 1}], None, TypeError, "prompt 0"),
    ([[1]], "greedy", TypeError, "sampling_params must be"),
    (["text"], None, ValueError, "no tokenizer"),
])
def test_bad_generate_arguments_raise_and_engine_stays_usable(llm, prompts, params, error, words):
    with pytest.raises(error, match=words):
        llm.generate(prompts, params, use_tqdm=False)
    assert not llm.engine.has_work()
    ok = llm.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
    assert len(ok[0]["token_ids"]) == 2


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(max_tokens=0), ValueError, "max_tokens must be >= 1"),
    (dict(temperature=-0.1), ValueError, "temperature must be >= 0"),
    (dict(top_p=0.0), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_k=0), ValueError, "top_k must be -1"),
    (dict(top_k=-2), ValueError, "top_k"),
    (dict(temperature="hot"), TypeError, "temperature must be a number"),
    (dict(max_tokens=2.5), TypeError, "max_tokens must be an int"),
    (dict(seed="x"), TypeError, "seed"),
    (dict(temperature=float("nan")), ValueError, "temperature must be a finite number, got nan"),
    (dict(temperature=float("inf")), ValueError, "temperature must be a finite number, got inf"),
    (dict(top_p=float("nan")), ValueError, "top_p must be a finite number"),
    (dict(top_p=float("-inf")), ValueError, "top_p must be a finite number"),
    (dict(logprobs=21), ValueError, r"logprobs must be in \[0, 20\], got 21"),
    (dict(logprobs=-1), ValueError, r"logprobs must be in \[0, 20\], got -1"),
    (dict(logprobs=True), TypeError, "logprobs must be an int or None, got bool"),
    (dict(stop=["x", ""]), ValueError, "stop strings must not be empty"),
    (dict(stop=[1]), TypeError, r"stop must be a str or a list of str, got \(1,\)"),
])
def test_bad_sampling_params_raise(kwargs, error, words):
    with pytest.raises(error, match=words):
        SamplingParams(**kwargs)


def test_mutated_sampling_params_are_revalidated_before_work(llm):
    params = SamplingParams()
    params.top_k = 0
    with pytest.raises(ValueError, match="top_k"):
        llm.generate([[1, 2]], params, use_tqdm=False)
    assert not llm.engine.has_work()
    params = SamplingParams()
    params.stop = ["a"]  # what the error message asks for is accepted when set after construction too
    params.validate()
    assert params.stop == ("a",)


def test_unknown_llm_keyword_raises_type_error_naming_it(llm):
    with pytest.raises(TypeError, match="tensor_paralel_size"):
        LLM(llm.config.model, tensor_paralel_size=1)


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(graph_batch_sizes=[8, 0]), ValueError, "positive ints"),
    (dict(graph_batch_sizes=[512], max_num_seqs=256), ValueError, "512 exceeds max_num_seqs=256"),
    (dict(kvcache_block_size=48), ValueError, "power of two"),
    (dict(dtype="int8"), ValueError, "dtype must be one of"),
    (dict(device="tpu"), ValueError, "device must be"),
    (dict(num_kvcache_blocks=2, kvcache_block_size=16), ValueError, "needs 4"),
])
def test_bad_llm_arguments_raise(llm, kwargs, error, words):
    args = dict(max_model_len=64)
    args.update(kwargs)
    with pytest.raises(error, match=words):
        LLM(llm.config.model, enforce_eager=True, **args)


def test_missing_model_directory_and_config_raise(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        LLM(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        LLM(str(tmp_path))


def test_unsupported_architecture_lists_supported(tmp_path):
    import json
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="LlamaForCausalLM"):
        LLM(str(tmp_path))


def test_missing_or_misshaped_tensor_is_named(tmp_path):
    from safetensors.torch import load_file, save_file
    path = build_checkpoint(tmp_path, "qwen2")
    tensors = load_file(f"{path}/model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.bias"]
    save_file(tensors, f"{path}/model.safetensors")
    with pytest.raises(ValueError, match="model.layers.1.self_attn.k_proj.bias"):
        LLM(path, enforce_eager=True, num_kvcache_blocks=64, kvcache_block_size=16)
    tensors["model.layers.1.self_attn.k_proj.bias"] = tensors["model.layers.1.self_attn.q_proj.bias"].clone()
    save_file(tensors, f"{path}/model.safetensors")
    with pytest.raises(ValueError, match=r"k_proj.bias.*shape \(64,\).*expects \(32,\)"):
        LLM(path, enforce_eager=True, num_kvcache_blocks=64, kvcache_block_size=16)


def test_missing_safetensors_file_raises(tmp_path):
    path = build_checkpoint(tmp_path, "llama")
    import os
    os.remove(f"{path}/model.safetensors")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        LLM(path, enforce_eager=True, num_kvcache_blocks=64, kvcache_block_size=16)


def test_truncated_safetensors_file_names_the_file(tmp_path):
    path = build_checkpoint(tmp_path, "llama")
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"model\.safetensors.*truncated or corrupt"):
        LLM(path, enforce_eager=True, num_kvcache_blocks=64, kvcache_block_size=16)


def test_unknown_load_format_raises(llm):
    with pytest.raises(ValueError, match="load_format must be one of 'safetensors', 'dummy', got 'pt'"):
        LLM(llm.config.model, enforce_eager=True, load_format="pt")


def test_nan_gpu_memory_utilization_raises(llm):
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        LLM(llm.config.model, enforce_eager=True, gpu_memory_utilization=float("nan"))
