"""MiniCPM / MiniCPM4: greedy float32 tokens equal the oracle's (transformers' Llama with the scalings folded into
its weights, ``nanovllm.tools.minicpm``) in eager and graph mode, across the LongRoPE boundary too; the oracle is
itself checked against plain Llama and a hand computation; unsupported configs are refused by name."""
import json
import math
import random
import shutil

import pytest
import torch

from conftest import MINICPM_TINY, build_minicpm_checkpoint, hf_greedy
from nanovllm import LLM, SamplingParams
from nanovllm.layers.rotary import RotaryEmbedding
from nanovllm.tools import minicpm

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
BOUNDARY = MINICPM_TINY["rope_scaling"]["original_max_position_embeddings"]  # 64
ENGINE = dict(kvcache_block_size=16, num_kvcache_blocks=64)


def prompts_of(lengths, seed=0):
    rng = random.Random(seed)
    return [[rng.randint(3, 383) for _ in range(n)] for n in lengths]


# One batch: short prompts; prompts longer than the boundary, prefilled in one step; and one that decodes across it
# (a 58-token prompt reaches 64 tokens of context at its 6th token).
MIXED = prompts_of([1, 9, 17, 33, 40])
ACROSS = prompts_of([100, 70, 58, 5], seed=1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(MiniCPM checkpoint, its oracle: a Llama checkpoint transformers loads)."""
    root = tmp_path_factory.mktemp("minicpm")
    path = build_minicpm_checkpoint(root / "minicpm")
    return path, str(minicpm.to_llama(path, root / "oracle"))


@pytest.fixture(scope="module")
def oracle_tokens(checkpoint):
    return hf_greedy(checkpoint[1], MIXED + ACROSS, 10)


def _tokens(llm, prompts):
    return [o["token_ids"] for o in llm.generate(prompts, GREEDY, use_tqdm=False)]


def test_eager_greedy_matches_the_oracle_on_a_mixed_length_batch(checkpoint, oracle_tokens):
    llm = LLM(checkpoint[0], enforce_eager=True, **ENGINE)
    assert _tokens(llm, MIXED) == oracle_tokens[:len(MIXED)]
    assert len({t for seq in oracle_tokens for t in seq}) > 10  # the outputs are not one repeated token


def test_longrope_prompts_past_the_boundary_and_decoding_across_it_match_the_oracle(checkpoint, oracle_tokens):
    """Per sequence and step, like transformers' per-forward choice: a prompt longer than the boundary takes the
    long factors for all its tokens in its one prefill step; the 58-token prompt switches while decoding."""
    llm = LLM(checkpoint[0], enforce_eager=True, **ENGINE)
    assert llm.engine.runner.model.model.rotary.long_after == BOUNDARY
    assert _tokens(llm, ACROSS) == oracle_tokens[len(MIXED):]


@pytest.mark.slow
def test_graph_mode_matches_the_oracle_without_recompiling(checkpoint, oracle_tokens):
    llm = LLM(checkpoint[0], graph_batch_sizes=[2, 4], max_num_seqs=4, max_model_len=128, **ENGINE)
    assert llm.engine.runner.mode == "graph"
    with torch.compiler.set_stance("fail_on_recompile"):
        assert _tokens(llm, MIXED + ACROSS) == oracle_tokens


def test_minicpm4_architecture_name_runs_the_same_model(checkpoint, oracle_tokens, tmp_path):
    """transformers' name and config spelling: model_type minicpm4, rope_parameters instead of rope_scaling."""
    path = tmp_path / "minicpm4"
    shutil.copytree(checkpoint[0], path)
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(architectures=["MiniCPM4ForCausalLM"], model_type="minicpm4",
               rope_parameters=dict(cfg.pop("rope_scaling"), rope_theta=10000.0))
    (path / "config.json").write_text(json.dumps(cfg))
    llm = LLM(str(path), enforce_eager=True, **ENGINE)
    assert type(llm.engine.runner.model).__name__ == "MiniCPM4ForCausalLM"
    assert _tokens(llm, ACROSS[:2]) == oracle_tokens[len(MIXED):len(MIXED) + 2]


def test_omitted_scalings_take_each_architectures_own_defaults():
    from nanovllm.models.minicpm import MiniCPM4ForCausalLM, MiniCPMForCausalLM
    cfg = {k: v for k, v in MINICPM_TINY.items() if k not in ("scale_emb", "scale_depth", "dim_model_base")}
    openbmb, hf = MiniCPMForCausalLM(cfg), MiniCPM4ForCausalLM(cfg)
    assert (openbmb.embed_scale, openbmb.residual_scale, openbmb.head_input_divisor) == (1.0, 1 / math.sqrt(2), 64.0)
    assert (hf.embed_scale, hf.residual_scale, hf.head_input_divisor) == (12.0, 1.4 / math.sqrt(2), 0.25)
    assert openbmb.args.tie_word_embeddings and hf.args.tie_word_embeddings
    none = MiniCPM4ForCausalLM(dict(cfg, scale_depth=None, dim_model_base=None))  # transformers: no scaling
    assert (none.residual_scale, none.head_input_divisor) == (1.0, 1.0)


def test_untied_lm_head_matches_the_oracle(tmp_path):
    path = build_minicpm_checkpoint(tmp_path / "untied", seed=1, tie_word_embeddings=False)
    prompts = MIXED[1:3] + ACROSS[:1]
    expected = hf_greedy(str(minicpm.to_llama(path, tmp_path / "oracle")), prompts, 10)
    assert _tokens(LLM(path, enforce_eager=True, **ENGINE), prompts) == expected


@pytest.mark.parametrize("bad,match", [(dict(sparse_config={"kernel_size": 32, "topk": 64}), "sparse_config="),
                                       (dict(num_experts=8), "num_experts=8")])
def test_sparse_attention_and_moe_configs_are_refused_by_name(tmp_path, bad, match):
    path = tmp_path / "bad"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(dict(MINICPM_TINY, **bad)))
    with pytest.raises(NotImplementedError, match=match):
        LLM(str(path), load_format="dummy", enforce_eager=True, **ENGINE)


def test_longrope_rows_switch_per_sequence_by_its_context_this_step():
    rope = RotaryEmbedding(16, 512, 10000.0, MINICPM_TINY["rope_scaling"])
    assert rope.cos_cache.shape == (1024, 16) and rope.long_after == 64
    # a prefill step: a 3-token chunk ending at 66 (long), a 2-token one ending at 64 (short), 1 padding token
    positions = torch.tensor([63, 64, 65, 62, 63, 0])
    rows = rope.table_rows(positions, torch.tensor([66, 64, 0], dtype=torch.int32),
                           torch.tensor([0, 3, 5, 6], dtype=torch.int32))
    assert rows.tolist() == [575, 576, 577, 62, 63, 0]


def test_longrope_tables_equal_transformers_short_and_long(checkpoint):
    from transformers import AutoConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    hf = LlamaRotaryEmbedding(AutoConfig.from_pretrained(checkpoint[1]))
    ours = RotaryEmbedding(16, 512, 10000.0, MINICPM_TINY["rope_scaling"])
    x = torch.zeros(1, 1, 16)
    for first, last in ((0, 63), (0, 99)):  # a forward ending at the boundary (short), one past it (long)
        cos, sin = hf(x, torch.arange(first, last + 1)[None])
        rows = torch.arange(first, last + 1) + (512 if last + 1 > BOUNDARY else 0)
        assert torch.equal(ours.cos_cache[rows], cos[0]) and torch.equal(ours.sin_cache[rows], sin[0])


def test_real_minicpm4_0_5b_config_never_switches_factors():
    """Its short and long factors are one list and original_max_position_embeddings is max_position_embeddings
    (32768): no context can pass the boundary, so one table serves every position."""
    cfg = minicpm.MINICPM4_0_5B
    rope = RotaryEmbedding(64, cfg["max_position_embeddings"], 10000.0, cfg["rope_scaling"])
    assert rope.long_after is None and rope.cos_cache.shape == (32768, 64)
