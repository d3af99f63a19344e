"""``synthesize --quantize fp8``'s random-weight checkpoint, written one tensor at a time, so that one too large to
hold fits (Qwen3-30B-A3B: 61 GB in bf16, 31 GB as block FP8).

The tensor names and shapes come from transformers' model built on the meta device, its stacked experts
(``mlp.experts.gate_up_proj`` [E, 2I, H], ``down_proj`` [E, H, I]) written per expert under the hub's names
(``mlp.experts.<e>.{gate,up,down}_proj.weight``; Mixtral's ``block_sparse_moe.experts.<e>.{w1,w3,w2}.weight`` and
``block_sparse_moe.gate``), so this engine and vLLM both load it as the real model.  Each tensor is drawn from
N(0, 0.02) in float32 on ``device`` (a generator seeded by ``seed`` and its index), cast to ``dtype``, block-quantized
where ``fp8_checkpoint.quantizable`` says (a ``weight_scale_inv`` per 128x128 block) and moved to the host; shards of
about ``shard_bytes`` get an index (one file: ``model.safetensors``).  RMSNorm weights are ones, a tied ``lm_head``
is left out.  Linear weights kept unquantized (LM head, routers) are listed in ``modules_to_not_convert``, as in
Qwen's FP8 checkpoints: vLLM quantizes a router that is not listed (it then routed on unset scales).
"""
import json
import logging
import re
from pathlib import Path

import torch

from nanovllm.quant.fp8_checkpoint import BlockLayout, quantizable
from nanovllm.tools.convert_gguf import atomic_output_dir

logger = logging.getLogger("nanovllm")

_EXPERT_PARTS = {"mixtral": ("block_sparse_moe", ("w1", "w3"), "w2")}  # else: mlp, (gate_proj, up_proj), down_proj


def hub_tensors(model, model_type: str):
    """(name, shape) of every tensor a hub checkpoint of ``model`` (transformers, any device) holds, in order."""
    prefix_leaf, gate_up, down = _EXPERT_PARTS.get(model_type, ("mlp", ("gate_proj", "up_proj"), "down_proj"))
    tied = getattr(model.config, "tie_word_embeddings", False)
    for name, t in model.state_dict().items():
        m = re.fullmatch(r"(.+)\.(mlp|block_sparse_moe)\.experts\.(gate_up_proj|down_proj)", name)
        if m is None:
            if not (tied and name == "lm_head.weight"):
                yield name.replace(".mlp.", f".{prefix_leaf}."), tuple(t.shape)  # Mixtral's router too
            continue
        base = f"{m[1]}.{prefix_leaf}.experts"
        experts, rows, cols = t.shape
        for e in range(experts):
            if m[3] == "gate_up_proj":
                for part in gate_up:
                    yield f"{base}.{e}.{part}.weight", (rows // 2, cols)
            else:
                yield f"{base}.{e}.{down}.weight", (rows, cols)


def write_stream(model, model_type: str, out: Path, dtype: torch.dtype, seed: int, device: str,
                 shard_bytes: int = 4 << 30, progress=None) -> dict:
    """Write ``model``'s tensors (``hub_tensors``) as block FP8 into ``out`` (``model-0000N.safetensors`` and
    ``model.safetensors.index.json``); returns the config's ``quantization_config``."""
    from safetensors.torch import save_file

    layout = BlockLayout()
    shard: dict[str, torch.Tensor] = {}
    kept: list[str] = []
    weight_map: dict[str, str] = {}
    files: list[str] = []

    def flush():
        if shard:
            files.append(f"model-{len(files) + 1:05d}.safetensors")
            save_file(shard, str(out / files[-1]), metadata={"format": "pt"})
            weight_map.update({n: files[-1] for n in shard})
            shard.clear()

    size = 0
    names = list(hub_tensors(model, model_type))
    for index, (name, shape) in enumerate(progress(names) if progress else names):
        if len(shape) == 1 and "norm" in name:
            t = torch.ones(shape, dtype=dtype)
        else:
            gen = torch.Generator(device=device).manual_seed(seed * 1_000_003 + index)
            t = torch.empty(shape, dtype=torch.float32, device=device).normal_(0.0, 0.02, generator=gen).to(dtype)
        if quantizable(name, t, []):
            q, scale_inv = layout.quantize(t)
            parts = {name: q, name + layout.suffix: scale_inv}
        else:
            parts = {name: t}
            if t.dim() == 2 and "embed" not in name:  # a Linear kept in dtype: the LM head, the routers
                kept.append(name.removesuffix(".weight"))
        for n, p in parts.items():
            shard[n] = p.cpu()
            size += p.numel() * p.element_size()
        if size >= shard_bytes:
            flush()
            size = 0
    flush()
    if len(files) == 1:  # one file: model.safetensors, no index
        (out / files[0]).rename(out / "model.safetensors")
        return layout.quantization_config(kept)
    final = {f: f.replace(".safetensors", f"-of-{len(files):05d}.safetensors") for f in files}
    for old, new in final.items():
        (out / old).rename(out / new)
    index = {"metadata": {}, "weight_map": {n: final[f] for n, f in weight_map.items()}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return layout.quantization_config(kept)


def synthesize_fp8(config, write_configs, out_dir, dtype: torch.dtype, seed: int, overwrite: bool) -> Path:
    """``synthesize``'s block-FP8 checkpoint of transformers ``config`` in ``out_dir`` (``write_configs(tmp)``
    writes config.json and the rest beside the weights)."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    config.architectures, config.dtype = [type(model).__name__], dtype
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with atomic_output_dir(Path(out_dir).expanduser(), overwrite) as tmp:
        quant = write_stream(model, config.model_type, tmp, dtype, seed, device,
                             progress=lambda names: tqdm(names, desc="synthesize", unit="tensor"))
        write_configs(tmp)
        path = tmp / "config.json"
        path.write_text(json.dumps(dict(json.loads(path.read_text()), quantization_config=quant), indent=2) + "\n")
    logger.info("synthesized %s as block FP8 (seed %d, drawn on %s) at %s", config.model_type, seed, device, out_dir)
    return Path(out_dir).expanduser()
