"""The loader reads sharded safetensors checkpoints and converts dtypes."""
import torch
import transformers

from conftest import build_checkpoint, hf_greedy, make_config
from nanovllm import LLM, SamplingParams


def test_sharded_checkpoint_with_index_loads_and_matches(tmp_path):
    path = build_checkpoint(tmp_path / "one", "qwen3")
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    model.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    prompts = [[5, 6, 7, 8], [9] * 20]
    out = LLM(str(tmp_path / "sharded"), enforce_eager=True, num_kvcache_blocks=64, kvcache_block_size=16).generate(
        prompts, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert [o["token_ids"] for o in out] == hf_greedy(path, prompts, 6)


def test_bfloat16_checkpoint_is_upcast_to_float32_on_cpu(tmp_path):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(make_config("llama"), dtype=torch.bfloat16)
    model.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path), enforce_eager=True, num_kvcache_blocks=64, kvcache_block_size=16)
    assert llm.engine.runner.dtype == torch.float32
    param = llm.engine.runner.model.model.embed_tokens.weight
    assert param.dtype == torch.float32
    assert torch.equal(param, model.model.embed_tokens.weight.float())
