"""The model-family tests' shared checks against transformers, on ``conftest``'s staggered engine and prompts: a
staggered batch in eager and graph mode, prefix hits past a small window, and a published multimodal checkpoint's
text path."""
import pytest
import torch

from conftest import STAGGERED_ENGINE, STAGGERED_PROMPTS, greedy_tokens, hf_greedy


def check_staggered_batch(path: str, eager, graph, lengths: list[int]) -> None:
    """``STAGGERED_PROMPTS``' greedy tokens, ``lengths[i]`` of prompt i, equal transformers' in ``eager`` and in
    ``graph`` (which must not recompile)."""
    want = [w[:n] for w, n in zip(hf_greedy(path, STAGGERED_PROMPTS, max(lengths)), lengths)]
    assert greedy_tokens(eager, STAGGERED_PROMPTS, lengths) == want
    with torch.compiler.set_stance("fail_on_recompile"):
        assert greedy_tokens(graph, STAGGERED_PROMPTS, lengths) == want


def check_text_path(model, path, text_arch: str) -> None:
    """A published multimodal checkpoint (``model``, random weights, saved to ``path``) runs as ``text_arch`` on
    ``STAGGERED_ENGINE``: a prompt's greedy tokens are the model's own, and an image is refused naming the class."""
    from PIL import Image

    from nanovllm import LLM
    model.save_pretrained(path)
    x = torch.tensor([STAGGERED_PROMPTS[0]])
    with torch.no_grad():
        want = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=6,
                              eos_token_id=None, pad_token_id=0)[0, x.shape[1]:].tolist()
    llm = LLM(str(path), enforce_eager=True, **STAGGERED_ENGINE)
    assert type(llm.engine.runner.model).__name__ == text_arch
    assert greedy_tokens(llm, STAGGERED_PROMPTS[:1], [6]) == [want]
    with pytest.raises(ValueError, match=f"{text_arch}: its vision tower is not supported"):
        llm.generate({"prompt_token_ids": [1, 2], "multi_modal_data": {"image": Image.new("RGB", (32, 32))}},
                     use_tqdm=False)


def check_prefix_hits(path: str, llm) -> None:
    """Four shared 16-token blocks (past a sliding model's small window), then different tails: ``llm`` gives
    transformers' tokens, and its second run hits the shared blocks of both prompts."""
    shared = list(range(30, 94))
    prompts = [shared + [7, 8, 9], shared + [11, 12]]
    want = hf_greedy(path, prompts, 8)
    manager = llm.engine.block_manager
    assert greedy_tokens(llm, prompts[:1], [8]) == want[:1]
    before = manager.cache_hit_tokens
    assert greedy_tokens(llm, prompts, [8, 8]) == want
    assert manager.cache_hit_tokens >= before + 2 * 64
