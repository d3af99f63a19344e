"""Collect calibration inputs for ``compress_experts --method activation``: the hidden states each
(layer, expert) of an MoE model saw while nanovllm generated.

    python -m nanovllm.tools.collect_moe_calib MODEL OUT --num-prompts N --max-new-tokens M --cap-per-group C
        [--prompts FILE] [--seed 0] [--batch 8] [--device auto] [--force]

The model runs eagerly; a hook before each MoE layer routes its input with the layer's router and keeps, per
expert the router picks, up to C rows (the first ones seen), as float32.  Prompts are the lines of ``--prompts``
(tokenized with MODEL's tokenizer) or, without it, N random token sequences drawn under ``--seed``.  OUT is one
safetensors file, ``layers.L.experts.E`` [n, hidden], with the settings in its metadata; it is written
atomically once all prompts ran, and a re-run with the same settings leaves it as it is (``--force`` redoes it).
The rows include the engine's padding rows of prefill steps, which are real inputs of those layers' experts.
"""
import argparse
import os
import random

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from nanovllm import LLM, SamplingParams
from nanovllm.kernels.moe_reference import route_reference
from nanovllm.models.moe import SparseMoe


class Recorder:
    """Per (layer, expert), the first ``cap`` input rows the router sent there."""

    def __init__(self, model, cap: int):
        self.cap, self.rows, self.handles = cap, {}, []
        for i, layer in enumerate(model.model.layers):
            if isinstance(layer.mlp, SparseMoe):
                self.handles.append(layer.mlp.register_forward_pre_hook(self._hook(i)))
        if not self.handles:
            raise ValueError("the model has no mixture-of-experts layer to collect inputs for")

    def _hook(self, layer: int):
        def hook(moe, args):
            x = args[0]
            _, ids = route_reference(torch.nn.functional.linear(x, moe.gate.weight), moe.top_k, moe.renormalize)
            for e in torch.unique(ids).tolist():
                kept = self.rows.setdefault((layer, e), [])
                room = self.cap - sum(r.shape[0] for r in kept)
                if room > 0:
                    picked = (ids == e).any(dim=1).nonzero()[:room, 0]
                    kept.append(x[picked].float().cpu())
        return hook

    def tensors(self) -> dict:
        return {f"layers.{l}.experts.{e}": torch.cat(r) for (l, e), r in sorted(self.rows.items())}

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def collect(model_dir: str, out: str, *, num_prompts: int, max_new_tokens: int, cap_per_group: int,
            prompts_file: str | None = None, seed: int = 0, batch: int = 8, force: bool = False,
            **engine) -> dict:
    """Write OUT (module docstring); returns its settings."""
    for name, value in (("num_prompts", num_prompts), ("max_new_tokens", max_new_tokens),
                        ("cap_per_group", cap_per_group), ("batch", batch)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")
    settings = {"model": os.path.abspath(model_dir), "num_prompts": str(num_prompts), "seed": str(seed),
                "max_new_tokens": str(max_new_tokens), "cap_per_group": str(cap_per_group),
                "prompts": os.path.abspath(prompts_file) if prompts_file else ""}
    if os.path.isfile(out) and not force:
        with safe_open(out, framework="pt") as f:
            if (f.metadata() or {}) == settings:
                return settings
    llm = LLM(model_dir, enforce_eager=True, **engine)
    if prompts_file:
        with open(prompts_file) as f:
            prompts = [line.strip() for line in f if line.strip()][:num_prompts]
    else:
        rng = random.Random(seed)
        vocab = llm.engine.runner.vocab_size
        prompts = [[rng.randrange(vocab) for _ in range(rng.randint(8, 64))] for _ in range(num_prompts)]
    recorder = Recorder(llm.engine.runner.model, cap_per_group)
    params = SamplingParams(temperature=0, max_tokens=max_new_tokens, ignore_eos=True)
    try:
        for b in tqdm(range(0, len(prompts), batch), desc="calibration prompts", unit="batch"):
            llm.generate(prompts[b:b + batch], params, use_tqdm=False)
    finally:
        recorder.close()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    save_file(recorder.tensors(), out + ".tmp", metadata=settings)
    os.replace(out + ".tmp", out)
    return settings


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--cap-per-group", type=int, default=2048, help="rows kept per (layer, expert)")
    p.add_argument("--prompts", help="a text file, one prompt per line (default: random token ids)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--force", action="store_true")
    a = p.parse_args(argv)
    collect(a.model, a.out, num_prompts=a.num_prompts, max_new_tokens=a.max_new_tokens,
            cap_per_group=a.cap_per_group, prompts_file=a.prompts, seed=a.seed, batch=a.batch, force=a.force,
            device=a.device)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
