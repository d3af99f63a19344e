"""Multi-LoRA throughput, ours or vLLM's, on bench's workload (nano-vllm's: ``--num-seqs`` prompts of 100-1,024
random ids, 100-1,024 output tokens each, temperature 0.6, ignore_eos), requests spread round robin over
``--adapters`` adapters; ``--adapters 0`` runs the same workload on the engine built without LoRA (the baseline
our own target is a share of).

    python -m benchmarks.lora_bench --engine nanovllm|vllm --model DIR [--load-format dummy] [--adapters 8]
        [--max-loras 8] [--rank 16] [--bs 256] [--num-seqs 256]

Adapters are random PEFT LoRA adapters of rank ``--rank`` on all seven projections of the model's config (scaled
small, so a dummy model stays a dummy model), written once per shape under ``--adapter-dir``; with more adapters
than ``--distinct`` files, ids share files round robin (each id is its own adapter to both engines: a slot swap
copies it).  Both engines get the same prompts and adapters; vLLM skips its tokenizer.  Writes
``lora_<engine>.json`` under ``$OUT`` and prints one line.
"""
import argparse
import json
import os
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


def run(args) -> dict:
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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=["nanovllm", "vllm"], default="nanovllm")
    p.add_argument("--model", required=True, help="checkpoint directory (config.json; weights unless dummy)")
    p.add_argument("--load-format", default=None, help="e.g. dummy")
    p.add_argument("--adapters", type=int, default=8, help="adapters the requests are spread over (0: no LoRA)")
    p.add_argument("--max-loras", type=int, default=8, help="device slots (fewer than adapters: swapping)")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--distinct", type=int, default=8, help="adapter files written (ids beyond share them)")
    p.add_argument("--adapter-dir", default="/tmp/nanovllm-lora-adapters")
    p.add_argument("--bs", type=int, default=256, help="max_num_seqs")
    p.add_argument("--num-seqs", type=int, default=256)
    p.add_argument("--max-input-len", type=int, default=1024)
    p.add_argument("--max-output-len", type=int, default=1024)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
