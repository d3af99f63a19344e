"""YaRN (and linear) rope scaling: the float32 cos/sin tables equal transformers' (``ROPE_INIT_FUNCTIONS["yarn"]`` and its rotary
modules) bit for bit, with and without mscale / mscale_all_dim, truncated or not (GPT-OSS); a tiny Qwen3 with YaRN
gives transformers' greedy tokens in eager and graph mode past ``original_max_position_embeddings``; a rope type
we lack is refused by name."""
import json
import random

import pytest
import torch

from conftest import build_checkpoint, hf_greedy
from nanovllm import LLM, SamplingParams
from nanovllm.kernels.norm_rope import rope_cos_sin, yarn_inv_freq
from nanovllm.models.decoder import DecoderArgs

# (original_max_position_embeddings, extra rope parameters): factor 4 throughout.
CASES = [(orig, extra) for orig in (32, 4096) for extra in (
    {}, {"truncate": False}, {"truncate": True}, {"mscale": 0.707, "mscale_all_dim": 0.707},
    {"mscale": 1.0, "mscale_all_dim": 0.8, "truncate": False}, {"mscale": 1.0},  # one of the two: plain mscale(s)
    {"attention_factor": 1.25}, {"beta_fast": 16.0, "beta_slow": 2.0})]


def _qwen3_config(orig: int, extra: dict, head_dim: int = 64, partial: float | None = None):
    import transformers
    rope = dict(rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=orig, **extra)
    if partial is not None:
        rope["partial_rotary_factor"] = partial
    return transformers.Qwen3Config(hidden_size=128, num_attention_heads=4, head_dim=head_dim,
                                    max_position_embeddings=4 * orig, rope_parameters=rope)


def _hf_cos_sin(rotary, positions: int, head_dim: int):
    x = torch.zeros(1, positions, head_dim)
    with torch.no_grad():
        return rotary(x, torch.arange(positions)[None])


@pytest.mark.parametrize("orig,extra", CASES)
def test_inv_freq_and_attention_factor_equal_transformers(orig, extra):
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = _qwen3_config(orig, extra)
    want_inv, want_factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    inv, factor = yarn_inv_freq(64, 1e6, dict(config.rope_parameters), config.max_position_embeddings)
    assert torch.equal(inv, want_inv)
    assert factor == want_factor


@pytest.mark.parametrize("orig,extra", [CASES[0], CASES[1], CASES[4], CASES[6]])
def test_cos_sin_tables_equal_transformers_rotary_module(orig, extra):
    """The whole table, attention factor included, against Qwen3RotaryEmbedding's output."""
    from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding
    config = _qwen3_config(orig, extra)
    rows = min(config.max_position_embeddings, 1024)
    cos, sin = rope_cos_sin(64, config.max_position_embeddings, 1e6, dict(config.rope_parameters))
    want_cos, want_sin = _hf_cos_sin(Qwen3RotaryEmbedding(config), rows, 64)
    assert torch.equal(cos[:rows], want_cos[0]) and torch.equal(sin[:rows], want_sin[0])
    assert cos.shape == (config.max_position_embeddings, 64)
    assert not torch.equal(cos, rope_cos_sin(64, config.max_position_embeddings, 1e6)[0])  # it does scale


def test_partial_rotary_dim_is_what_yarn_scales():
    """A partial rope (the hybrids pass the rotated width as head_dim): transformers builds YaRN over that width."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    config = _qwen3_config(32, {}, head_dim=64, partial=0.25)
    want_inv, want_factor = ROPE_INIT_FUNCTIONS["yarn"](config, "cpu")
    inv, factor = yarn_inv_freq(16, 1e6, dict(config.rope_parameters), config.max_position_embeddings)
    assert torch.equal(inv, want_inv) and factor == want_factor


def test_gpt_oss_yarn_without_truncation_equals_transformers():
    """GPT-OSS's defaults (factor 32, original 4096, beta 32/1, truncate false, theta 150000, head_dim 64): its
    half-width cos/sin (a chunked rotation) are both halves of our rotate-half table."""
    import transformers
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding
    config = transformers.GptOssConfig()
    rope = dict(config.rope_parameters)
    assert rope["rope_type"] == "yarn" and rope["truncate"] is False
    cos, sin = rope_cos_sin(config.head_dim, 8192, rope["rope_theta"], rope)  # the first 8192 rows of the table
    want_cos, want_sin = _hf_cos_sin(GptOssRotaryEmbedding(config), 8192, config.head_dim)
    half = config.head_dim // 2
    for mine, want in ((cos, want_cos[0]), (sin, want_sin[0])):
        assert torch.equal(mine[:, :half], want) and torch.equal(mine[:, half:], want)
    _, factor = yarn_inv_freq(config.head_dim, rope["rope_theta"], rope, config.max_position_embeddings)
    assert factor == pytest.approx(0.1 * torch.log(torch.tensor(32.0)).item() + 1)  # the "concentration" 1.3466


def test_defaults_and_the_top_level_original_length():
    """No factor: max_position / original; no original length: max_position (so no scaling, factor 1); the config's
    top-level original_max_position_embeddings wins over the rope dict's, as in transformers."""
    base = dict(rope_type="yarn", original_max_position_embeddings=32)
    implied, explicit = yarn_inv_freq(32, 1e4, base, 128), yarn_inv_freq(32, 1e4, dict(base, factor=4.0), 128)
    assert torch.equal(implied[0], explicit[0]) and implied[1] == explicit[1]
    inv, factor = yarn_inv_freq(32, 1e4, dict(rope_type="yarn"), 128)
    assert factor == 1.0 and torch.allclose(inv, 1.0 / 1e4 ** (torch.arange(0, 32, 2).float() / 32))
    cfg = dict(vocab_size=8, hidden_size=64, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8,
               max_position_embeddings=128, original_max_position_embeddings=16,
               rope_parameters=dict(base, factor=4.0, rope_theta=1e4))
    assert DecoderArgs.from_hf(cfg, qk_norm=True).rope_scaling["original_max_position_embeddings"] == 16


def test_unknown_rope_type_is_refused_by_name():
    with pytest.raises(NotImplementedError, match="'dynamic'.*yarn"):
        rope_cos_sin(32, 64, 1e4, dict(rope_type="dynamic", factor=2.0))


# A tiny Qwen3 with YaRN: factor 4 over an original 32 positions (max_position_embeddings 128).
YARN = dict(rope_type="yarn", rope_theta=1e6, factor=4.0, original_max_position_embeddings=32)
GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
ENGINE = dict(kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=128)
_rng = random.Random(0)
PROMPTS = [[_rng.randint(3, 383) for _ in range(n)] for n in (64, 5, 40, 27)]  # 64 > 32; 27 decodes across it


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_checkpoint(tmp_path_factory.mktemp("qwen3_yarn"), "qwen3", max_position_embeddings=128,
                            rope_parameters=YARN)


@pytest.fixture(scope="module")
def oracle_tokens(checkpoint):
    return hf_greedy(checkpoint, PROMPTS, 10)


def _tokens(llm, prompts):
    return [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def test_tiny_qwen3_yarn_eager_matches_transformers(checkpoint, oracle_tokens):
    cfg = json.loads(open(f"{checkpoint}/config.json").read())
    assert (cfg.get("rope_parameters") or cfg.get("rope_scaling"))["rope_type"] == "yarn"
    llm = LLM(checkpoint, enforce_eager=True, **ENGINE)
    assert llm.engine.runner.model.model.rotary.cos_cache.abs().max() > 1.0  # the attention factor is in
    assert _tokens(llm, PROMPTS) == oracle_tokens
    assert len({t for seq in oracle_tokens for t in seq}) > 10  # not one repeated token


def test_tiny_qwen3_yarn_graph_mode_matches_transformers(checkpoint, oracle_tokens):
    llm = LLM(checkpoint, graph_batch_sizes=[2, 4], max_num_seqs=4, **ENGINE)
    assert llm.engine.runner.mode == "graph"
    with torch.compiler.set_stance("fail_on_recompile"):
        assert _tokens(llm, PROMPTS) == oracle_tokens


def test_legacy_rope_scaling_spelling_runs_the_same(checkpoint, oracle_tokens, tmp_path):
    """Qwen3's model card adds ``"rope_scaling": {"rope_type": "yarn", ...}`` to config.json; the older
    ``"type"`` key too."""
    import shutil
    path = tmp_path / "legacy"
    shutil.copytree(checkpoint, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg.update(rope_theta=1e6, rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32})
    (path / "config.json").write_text(json.dumps(cfg))
    llm = LLM(str(path), enforce_eager=True, **ENGINE)
    assert _tokens(llm, PROMPTS[:2]) == oracle_tokens[:2]


def test_linear_scaling_equals_transformers():
    """Gemma 3's global layers: positions divided by the factor."""
    import transformers
    rope = dict(rope_type="linear", rope_theta=1e6, factor=8.0)
    config = transformers.Qwen3Config(hidden_size=128, num_attention_heads=4, head_dim=64, rope_parameters=rope)
    want = _hf_cos_sin(transformers.models.qwen3.modeling_qwen3.Qwen3RotaryEmbedding(config), 96, 64)
    cos, sin = rope_cos_sin(64, 96, 1e6, rope)
    assert torch.equal(cos, want[0][0]) and torch.equal(sin, want[1][0])
