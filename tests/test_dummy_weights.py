"""``load_format="dummy"``: random weights from config.json alone, deterministic under ``seed``."""
import json

import torch

from conftest import make_config
from nanovllm import LLM, SamplingParams


def _config_only_dir(tmp_path):
    config = make_config("qwen3").to_dict()
    config["architectures"] = ["Qwen3ForCausalLM"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    return str(tmp_path)


def _llm(path, seed):
    return LLM(path, load_format="dummy", seed=seed, enforce_eager=True, kvcache_block_size=16,
               num_kvcache_blocks=32, max_model_len=64, max_num_seqs=4)


def test_dummy_weights_need_only_config_and_follow_the_seed(tmp_path):
    path = _config_only_dir(tmp_path)
    a, b, c = _llm(path, 0), _llm(path, 0), _llm(path, 1)
    wa, wb, wc = (dict(x.engine.runner.model.named_parameters()) for x in (a, b, c))
    name = "model.layers.0.self_attn.qkv_proj.weight"
    assert torch.equal(wa[name], wb[name]) and not torch.equal(wa[name], wc[name])
    assert float(wa[name].std()) > 0.01
    assert torch.equal(wa["model.norm.weight"], torch.ones_like(wa["model.norm.weight"]))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    out = [x.generate([[1, 2, 3]], params, use_tqdm=False)[0]["token_ids"] for x in (a, b)]
    assert out[0] == out[1] and len(out[0]) == 4
