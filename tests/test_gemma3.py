"""Gemma 3 text (``models/gemma3.py``): greedy float32 tokens identical to transformers in eager and graph mode,
with a 12-token sliding window that ends mid-block (16-token blocks) on two of three layers, prompts and
generations longer than the window and than a prefill chunk, sequences that start and finish at different steps;
a prefix-cache hit gives a cold engine's tokens; a published ``Gemma3ForConditionalGeneration`` checkpoint runs
its text path and refuses an image by name.
"""
import pytest
import torch

from conftest import STAGGERED_ENGINE as ENGINE, STAGGERED_PROMPTS as PROMPTS, build_checkpoint, hf_greedy
from conftest import greedy_tokens as tokens
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
    want = [w[:n] for w, n in zip(hf_greedy(path, PROMPTS, max(lengths)), lengths)]
    assert tokens(eager, PROMPTS, lengths) == want
    with torch.compiler.set_stance("fail_on_recompile"):
        assert tokens(graph, PROMPTS, lengths) == want


def test_prefix_hits_give_transformers_tokens(engines):
    """Four shared full blocks (past the window), then different tails: the second and third runs hit them."""
    path, eager, _ = engines
    shared = list(range(30, 94))
    prompts = [shared + [7, 8, 9], shared + [11, 12]]
    want = hf_greedy(path, prompts, 8)
    manager = eager.engine.block_manager
    assert tokens(eager, prompts[:1], [8]) == want[:1]
    before = manager.cache_hit_tokens
    assert tokens(eager, prompts, [8, 8]) == want
    assert manager.cache_hit_tokens >= before + 2 * 64


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
    model.save_pretrained(tmp_path)
    x = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        want = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=6,
                              eos_token_id=None, pad_token_id=0)[0, x.shape[1]:].tolist()
    llm = LLM(str(tmp_path), enforce_eager=True, **ENGINE)
    assert type(llm.engine.runner.model).__name__ == "Gemma3ForCausalLM"
    assert tokens(llm, PROMPTS[:1], [6]) == [want]
    from PIL import Image
    with pytest.raises(ValueError, match="Gemma3ForCausalLM: its vision tower is not supported"):
        llm.generate({"prompt_token_ids": [1, 2], "multi_modal_data": {"image": Image.new("RGB", (32, 32))}},
                     use_tqdm=False)
