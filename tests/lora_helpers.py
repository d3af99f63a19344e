"""Shared by the LoRA engine tests: random PEFT adapters of a tiny checkpoint and the PEFT oracle (transformers +
``peft.PeftModel``, greedy, float32, one prompt at a time).  MiniCPM, which transformers lacks, runs in the oracle
as its Llama stand-in (``nanovllm.tools.minicpm``) with stand-in adapters (``STAND_INS``)."""
import math
import os
import shutil

import torch

from conftest import build_checkpoint, build_minicpm_checkpoint

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QVD = ["q_proj", "v_proj", "down_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
ENGINE = dict(dtype="float32", enforce_eager=True, enable_lora=True, max_loras=3, max_lora_rank=16,
              kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=160, max_num_seqs=4,
              max_num_batched_tokens=48)  # 48-token prefill chunks: long prompts span several blocks and chunks
PROMPTS = [[5, 9, 33, 100, 7, 8] * 6, [3, 4, 5], list(range(10, 40)), [200, 17, 17, 3] * 5]
N = 8


def make_adapter(base: str, path: str, r: int, targets, seed: int, auto: str = "AutoModelForCausalLM", **kw) -> str:
    """Save a PEFT LoRA adapter of ``base`` (loaded by transformers' ``auto`` class; rank ``r`` on ``targets``, a
    list of module names or a regex, every lora weight drawn N(0, 0.1))."""
    import peft
    import transformers
    torch.manual_seed(seed)
    model = getattr(transformers, auto).from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, **kw)
    pm = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    pm.save_pretrained(path)
    return path


def build_family(tmp: str, arch: str, **overrides) -> tuple[str, dict]:
    """A tiny ``arch`` checkpoint (``overrides`` its config's) and three adapters: a1 (r 8, all seven), a2 (r 16, q v
    down), a3 (r 8, MLP only, rsLoRA).  ``gemma4``: ``test_gemma4``'s model; ``minicpm``: ``MINICPM_TINY``."""
    base = os.path.join(tmp, "base")
    if arch == "gemma4":
        from test_gemma4 import build
        base = build(base, **overrides)
    elif arch == "minicpm":
        return _minicpm_family(tmp, build_minicpm_checkpoint(base, **overrides))
    else:
        base = build_checkpoint(base, arch, **overrides)
    return base, _adapters(tmp, base)


def _adapters(tmp: str, base: str) -> dict:
    return {"a1": make_adapter(base, os.path.join(tmp, "a1"), 8, ALL, 1),
            "a2": make_adapter(base, os.path.join(tmp, "a2"), 16, QVD, 2),
            "a3": make_adapter(base, os.path.join(tmp, "a3"), 8, MLP, 3, use_rslora=True)}


STAND_INS: dict = {}  # a MiniCPM checkpoint or adapter path -> what the oracle runs in its place


def _minicpm_family(tmp: str, base: str) -> tuple[str, dict]:
    """MiniCPM's adapters are drawn on its Llama stand-in (the same module names and shapes).  openbmb's layer adds
    ``scale_depth / sqrt(layers)`` times each branch's output, o_proj's and down_proj's adapter products included;
    the stand-in has that scale folded into those two weights, so its adapters carry it in their B."""
    import json
    from safetensors.torch import load_file, save_file
    from nanovllm.tools import minicpm
    llama = STAND_INS[base] = str(minicpm.to_llama(base, os.path.join(tmp, "llama")))
    with open(os.path.join(base, "config.json")) as f:
        cfg = minicpm.with_defaults(json.load(f))
    scale = cfg["scale_depth"] / math.sqrt(cfg["num_hidden_layers"])
    adapters = _adapters(tmp, llama)
    for path in adapters.values():
        stand_in = STAND_INS[path] = shutil.copytree(path, path + "-llama")
        tensors = load_file(os.path.join(path, "adapter_model.safetensors"))
        save_file({k: v * scale if ".lora_B." in k and (".o_proj." in k or ".down_proj." in k) else v
                   for k, v in tensors.items()}, os.path.join(stand_in, "adapter_model.safetensors"))
    return base, adapters


_ORACLE: dict = {}


def peft_greedy(base: str, adapter: str | None, prompts: list[list[int]], n: int = N) -> list[list[int]]:
    """transformers' greedy tokens of ``base`` with PEFT adapter ``adapter`` (None: the base), cached."""
    import peft
    import transformers
    base, adapter = STAND_INS.get(base, base), STAND_INS.get(adapter, adapter)
    todo = [p for p in prompts if (base, adapter, tuple(p), n) not in _ORACLE]
    if todo:
        model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        if adapter is not None:
            model = peft.PeftModel.from_pretrained(model, adapter)
        model.eval()
        for p in todo:
            x = torch.tensor([p])
            with torch.no_grad():
                y = model.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=n,
                                   min_new_tokens=0, eos_token_id=None, pad_token_id=0)
            _ORACLE[(base, adapter, tuple(p), n)] = y[0, len(p):].tolist()
    return [_ORACLE[(base, adapter, tuple(p), n)] for p in prompts]


def expected(base: str, requests: list, prompts: list[list[int]], n: int = N) -> list[list[int]]:
    """The oracle's tokens of each prompt under its ``LoRARequest`` (or None)."""
    return [peft_greedy(base, r.lora_path if r else None, [p], n)[0] for r, p in zip(requests, prompts)]


def generate(llm, prompts, requests, n: int = N) -> list[list[int]]:
    from nanovllm import SamplingParams
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    return [o["token_ids"] for o in llm.generate(prompts, params, use_tqdm=False, lora_request=requests)]
