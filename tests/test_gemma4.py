"""Gemma 4 text (``models/gemma4.py``): greedy float32 tokens identical to transformers in eager and graph mode, for a
tiny model with per-layer inputs, full layers of their own head size and KV heads with K as V and proportional rope,
a 12-token window ending mid-block (16-token blocks), staggered rows past the window and a prefill chunk; a prefix
hit gives a cold engine's tokens; KV sharing (the last layers reading earlier layers' caches and keeping none, double
wide MLPs); a published ``Gemma4ForConditionalGeneration`` checkpoint runs its text path and refuses an image by
name; the MoE block beside the MLP (GELU experts) against transformers.
"""
import pytest
import torch

from conftest import STAGGERED_ENGINE as ENGINE, STAGGERED_PROMPTS as PROMPTS, hf_greedy
from conftest import greedy_tokens as tokens
from family_checks import check_prefix_hits, check_staggered_batch, check_text_path
from nanovllm import LLM

KINDS = ["sliding_attention", "sliding_attention", "full_attention", "sliding_attention", "full_attention"]


def text_config(**overrides):
    import transformers
    kw = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=5, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, global_head_dim=32, num_global_key_value_heads=1,
              attention_k_eq_v=True, sliding_window=12, layer_types=KINDS, hidden_size_per_layer_input=8,
              vocab_size_per_layer_input=256, max_position_embeddings=512, final_logit_softcapping=30.0,
              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                               "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.5,
                                                  "rope_theta": 1e6}},
              pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    return transformers.Gemma4TextConfig(**dict(kw, **overrides))


def randomize(model):
    """Weights drawn at random: norms (plain ``x * w``) and router scales near 1, layer scalars in [0.5, 1.5]."""
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.uniform_(0.8, 1.2) if "norm" in name or "scale" in name else p.normal_(0.0, 0.08)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.uniform_(0.5, 1.5)
    return model


def build(path, **overrides) -> str:
    import transformers
    randomize(transformers.Gemma4ForCausalLM(text_config(**overrides)).float()).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    path = build(tmp_path_factory.mktemp("gemma4"))
    return path, LLM(path, enforce_eager=True, **ENGINE), LLM(path, graph_batch_sizes=[1, 2, 4], **ENGINE)


def test_layers_follow_the_config(engines):
    _, _, graph = engines
    runner = graph.engine.runner
    attn = [layer.self_attn for layer in runner.model.model.layers]
    assert [a.window for a in attn] == [12, 12, 0, 12, 0]
    assert [(a.num_kv_heads, a.head_dim, a.v_proj is None) for a in attn[1:3]] == [(2, 16, False), (1, 32, True)]
    assert [tuple(k.shape[1:]) for k, _ in runner.kv_caches[1:3]] == [(2, 16, 16), (1, 16, 32)]
    assert runner.mode == "graph"


def test_staggered_batch_past_the_window_matches_transformers_in_both_modes(engines):
    path, eager, graph = engines
    lengths = [20, 5, 14, 24, 3]  # generations longer than the window; rows finish at different steps
    check_staggered_batch(path, eager, graph, lengths)


def test_prefix_hits_give_transformers_tokens(engines):
    """Four shared full blocks (past the window), then different tails: the second and third runs hit them."""
    path, eager, _ = engines
    check_prefix_hits(path, eager)


@pytest.mark.slow
def test_kv_shared_layers_match_transformers(tmp_path):
    """The last two layers read the caches of layer 1 (sliding) and 2 (full) and keep none of their own (one shared
    layer: the MoE test)."""
    path = build(tmp_path, num_kv_shared_layers=2, use_double_wide_mlp=True)
    lengths = [16, 4, 10, 18, 3]
    want = [w[:n] for w, n in zip(hf_greedy(path, PROMPTS, max(lengths)), lengths)]
    for llm in (LLM(path, enforce_eager=True, **ENGINE), LLM(path, graph_batch_sizes=[1, 4], **ENGINE)):
        runner = llm.engine.runner
        assert runner.model.sources == [None] * 3 + [1, 2]
        assert [k.shape[0] == 0 for k, _ in runner.kv_caches] == [False] * 3 + [True] * 2
        assert tokens(llm, PROMPTS, lengths) == want
        llm.close()


def test_published_multimodal_checkpoint_runs_its_text_path(tmp_path):
    import transformers
    vision = transformers.Gemma4VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                                             patch_size=4, pooling_kernel_size=2)
    config = transformers.Gemma4Config(text_config=text_config().to_dict(), vision_config=vision.to_dict())
    model = randomize(transformers.Gemma4ForConditionalGeneration(config).float())
    check_text_path(model, tmp_path, "Gemma4ForCausalLM")


@pytest.mark.slow
def test_moe_block_matches_transformers(tmp_path):
    """A MoE block beside every MLP (4 experts, top 2; GELU experts through ``ops.moe_experts``), with the last layer
    reading layer 2's (full) cache, its MLP double wide."""
    path = build(tmp_path, enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
                 num_kv_shared_layers=1, use_double_wide_mlp=True)
    lengths = [16, 4, 10, 18, 3]
    want = [w[:n] for w, n in zip(hf_greedy(path, PROMPTS, max(lengths)), lengths)]
    for llm in (LLM(path, enforce_eager=True, **ENGINE), LLM(path, graph_batch_sizes=[1, 4], **ENGINE)):
        runner = llm.engine.runner
        assert all(layer.moe for layer in runner.model.model.layers)
        assert runner.model.sources == [None] * 4 + [2] and runner.kv_caches[4][0].shape[0] == 0
        assert tokens(llm, PROMPTS, lengths) == want
        llm.close()


@pytest.mark.slow
def test_bf16_graph_mode_diverges_only_at_near_ties(tmp_path):
    """bf16 graph mode under the logprob-margin rule (``tools.oracle``): without Inductor rounding its fused
    intermediates as eager does (``compile.factory.round_like_eager``), these prompts left transformers' tokens past
    near ties, on the CPU as on an H200."""
    from nanovllm.tools import oracle
    engine = dict(kvcache_block_size=16, graph_batch_sizes=[8], max_model_len=512, max_num_seqs=8,
                  num_kvcache_blocks=256)
    verdicts = oracle.run(build(tmp_path), "bfloat16", "cpu", 4, 8, 0.1, enforce_eager=False, **engine)
    assert [v for v in verdicts if v["status"] not in ("identical", "near-tie")] == []
