"""Gemma 3 text (``models/gemma3.py``): greedy float32 tokens identical to transformers in eager and graph mode,
with a 12-token sliding window that ends mid-block (16-token blocks) on two of three layers, prompts and
generations longer than the window and than a prefill chunk, sequences that start and finish at different steps;
a prefix-cache hit gives a cold engine's tokens; a published ``Gemma3ForConditionalGeneration`` checkpoint runs
its text path and refuses an image by name.
"""
import pytest
import torch

from conftest import STAGGERED_ENGINE as ENGINE, build_checkpoint
from family_checks import check_prefix_hits, check_staggered_batch, check_text_path
from nanovllm import LLM


@pytest.fixture(scope="module")
def engines(tmp_path_factory):
    path = build_checkpoint(tmp_path_factory.mktemp("gemma3"), "gemma3")
    return path, LLM(path, enforce_eager=True, **ENGINE), LLM(path, graph_batch_sizes=[1, 2, 4], **ENGINE)


def test_layers_follow_the_config(engines):
    _, _, graph = engines
    layers = graph.engine.runner.model.model.layers
    assert [layer.self_attn.window for layer in layers] == [12, 12, 0]
    assert graph.engine.runner.mode == "graph"


def test_staggered_batch_past_the_window_matches_transformers_in_both_modes(engines):
    path, eager, graph = engines
    lengths = [20, 5, 14, 24, 3]  # generations longer than the window; rows finish at different steps
    check_staggered_batch(path, eager, graph, lengths)


def test_prefix_hits_give_transformers_tokens(engines):
    """Four shared full blocks (past the window), then different tails: the second and third runs hit them."""
    path, eager, _ = engines
    check_prefix_hits(path, eager)


def test_published_multimodal_checkpoint_runs_its_text_path(tmp_path):
    import transformers
    from conftest import make_config
    text = make_config("gemma3")
    vision = transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                             num_attention_heads=2, image_size=28, patch_size=14)
    config = transformers.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                       mm_tokens_per_image=4)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(config).float()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.08)
    check_text_path(model, tmp_path, "Gemma3ForCausalLM")
