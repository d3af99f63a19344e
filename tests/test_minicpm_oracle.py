"""The MiniCPM oracle (``nanovllm.tools.minicpm``: transformers' Llama with the scalings folded into its weights) is
itself right: with every scale 1 it is plain Llama, and it agrees with MiniCPM's forward written out by hand.  And
``synthesize minicpm4-0.5b`` writes MiniCPM4-0.5B's real config with random weights, on which ``tools.oracle``
finds nanovllm and transformers token-identical."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import MINICPM_TINY, build_minicpm_checkpoint
from nanovllm.tools import minicpm


def _oracle(path, tmp_path):
    from transformers import LlamaForCausalLM
    return LlamaForCausalLM.from_pretrained(minicpm.to_llama(path, tmp_path / "oracle"), dtype=torch.float32).eval()


def _logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_with_every_scale_one_the_oracle_is_plain_llama(tmp_path):
    """scale_emb 1, scale_depth sqrt(layers) and dim_model_base = hidden_size make every scaling 1."""
    from transformers import LlamaForCausalLM
    cfg = dict(MINICPM_TINY, scale_emb=1, scale_depth=math.sqrt(2), dim_model_base=64)
    path = build_minicpm_checkpoint(tmp_path / "ones", **cfg)
    plain = LlamaForCausalLM(minicpm.llama_config(cfg, tie_word_embeddings=True)).eval()
    missing, unexpected = plain.load_state_dict(load_file(f"{path}/model.safetensors"), strict=False)
    assert (missing, unexpected) == (["lm_head.weight"], [])  # tied: the head is the embedding
    plain.tie_weights()
    oracle = _oracle(path, tmp_path)
    for ids in ([5, 9, 200, 17], list(range(3, 83))):  # inside and past the LongRoPE boundary (64)
        assert torch.equal(_logits(oracle, ids), _logits(plain, ids))


def _hand_forward(cfg: dict, w: dict, ids: list[int]) -> torch.Tensor:
    """openbmb's MiniCPM, one forward pass over ``ids`` written out (one decoder layer): logits [T, V]."""
    eps, heads, kv_heads = cfg["rms_norm_eps"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg["hidden_size"] // heads
    n = len(ids)
    residual_scale = cfg["scale_depth"] / math.sqrt(cfg["num_hidden_layers"])

    def rms(x, g):
        return g * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    rope = cfg["rope_scaling"]
    boundary = rope["original_max_position_embeddings"]
    factors = torch.tensor(rope["long_factor"] if n > boundary else rope["short_factor"])
    angle = torch.arange(n).float()[:, None] / (factors * 10000.0 ** (torch.arange(0, d, 2).float() / d))
    mscale = math.sqrt(1 + math.log(cfg["max_position_embeddings"] / boundary) / math.log(boundary))
    cos, sin = (torch.cat([f(angle)] * 2, -1)[:, None, :] * mscale for f in (torch.cos, torch.sin))

    def rotate(x):
        return x * cos + torch.cat((-x[..., d // 2:], x[..., :d // 2]), -1) * sin

    p = "model.layers.0."
    x = w["model.embed_tokens.weight"][ids] * cfg["scale_emb"]
    h = rms(x, w[p + "input_layernorm.weight"])
    q = rotate((h @ w[p + "self_attn.q_proj.weight"].T).view(n, heads, d))
    k = rotate((h @ w[p + "self_attn.k_proj.weight"].T).view(n, kv_heads, d)).repeat_interleave(heads // kv_heads, 1)
    v = (h @ w[p + "self_attn.v_proj.weight"].T).view(n, kv_heads, d).repeat_interleave(heads // kv_heads, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / math.sqrt(d)
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, heads * d)
    x = x + (o @ w[p + "self_attn.o_proj.weight"].T) * residual_scale
    h = rms(x, w[p + "post_attention_layernorm.weight"])
    gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
    x = x + ((torch.nn.functional.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T) * residual_scale
    h = rms(x, w["model.norm.weight"]) / (cfg["hidden_size"] / cfg["dim_model_base"])
    return h @ w["model.embed_tokens.weight"].T  # tied


def test_the_oracle_agrees_with_a_hand_computed_layer_inside_and_past_the_longrope_boundary(tmp_path):
    cfg = dict(MINICPM_TINY, num_hidden_layers=1)
    path = build_minicpm_checkpoint(tmp_path / "one_layer", **cfg)
    weights = load_file(f"{path}/model.safetensors")
    oracle = _oracle(path, tmp_path)
    for n in (20, 80):
        ids = [(7 * i + 3) % 384 for i in range(n)]
        hand = _hand_forward(cfg, weights, ids)
        assert torch.allclose(_logits(oracle, ids), hand, rtol=1e-4, atol=1e-5), n
    wrong = dict(cfg, scale_emb=1)  # the comparison can tell a missed scaling
    assert not torch.allclose(_logits(oracle, ids), _hand_forward(wrong, weights, ids), rtol=1e-4, atol=1e-5)


def test_synthesized_minicpm4_0_5b_has_the_real_config_and_matches_the_oracle(tmp_path):
    from nanovllm.tools import oracle, synthesize
    small = dict(num_hidden_layers=1, vocab_size=512, intermediate_size=256)  # real width, heads and LongRoPE
    out = synthesize.synthesize("minicpm4-0.5b", tmp_path / "ckpt", dtype="float32", **small)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg == dict(minicpm.MINICPM4_0_5B, **small, torch_dtype="float32")
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))  # tied, as the real checkpoint
    gen = json.loads((out / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, [2, 73440], 2)
    again = synthesize.synthesize(out / "config.json", tmp_path / "again", dtype="float32")  # a config.json path
    assert json.loads((again / "config.json").read_text()) == cfg
    prompts = [[(11 * i + 5) % 512 for i in range(n)] for n in (3, 40)]
    verdicts = oracle.run(str(out), "float32", "cpu", len(prompts), 6, 0.0, prompts=prompts, enforce_eager=True,
                          kvcache_block_size=16, num_kvcache_blocks=16, max_model_len=64)
    assert [v["status"] for v in verdicts] == ["identical", "identical"], verdicts


def test_oracle_conversion_refuses_a_checkpoint_that_is_not_minicpm(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="model_type 'llama'"):
        minicpm.to_llama(tmp_path, tmp_path / "out")
