"""Shared by the LoRA engine tests: random PEFT adapters of a tiny checkpoint and the PEFT oracle (transformers +
``peft.PeftModel``, greedy, float32, one prompt at a time)."""
import os

import torch

from conftest import build_checkpoint

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
QVD = ["q_proj", "v_proj", "down_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
ENGINE = dict(dtype="float32", enforce_eager=True, enable_lora=True, max_loras=3, max_lora_rank=16,
              kvcache_block_size=16, num_kvcache_blocks=64, max_model_len=160, max_num_seqs=4,
              max_num_batched_tokens=48)  # 48-token prefill chunks: long prompts span several blocks and chunks
PROMPTS = [[5, 9, 33, 100, 7, 8] * 6, [3, 4, 5], list(range(10, 40)), [200, 17, 17, 3] * 5]
N = 8


def make_adapter(base: str, path: str, r: int, targets: list[str], seed: int, **kw) -> str:
    """Save a PEFT LoRA adapter of ``base`` (rank ``r`` on ``targets``, every lora weight drawn N(0, 0.1))."""
    import peft
    import transformers
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, init_lora_weights=False, **kw)
    pm = peft.get_peft_model(model, config)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.1)
    pm.save_pretrained(path)
    return path


def build_family(tmp: str, arch: str) -> tuple[str, dict]:
    """A tiny ``arch`` checkpoint and three adapters: a1 (r 8, all seven), a2 (r 16, q v down), a3 (r 8, MLP only,
    rsLoRA)."""
    base = build_checkpoint(os.path.join(tmp, "base"), arch)
    return base, {"a1": make_adapter(base, os.path.join(tmp, "a1"), 8, ALL, 1),
                  "a2": make_adapter(base, os.path.join(tmp, "a2"), 16, QVD, 2),
                  "a3": make_adapter(base, os.path.join(tmp, "a3"), 8, MLP, 3, use_rslora=True)}


_ORACLE: dict = {}


def peft_greedy(base: str, adapter: str | None, prompts: list[list[int]], n: int = N) -> list[list[int]]:
    """transformers' greedy tokens of ``base`` with PEFT adapter ``adapter`` (None: the base), cached."""
    import peft
    import transformers
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
