"""MiniCPM checkpoints for the tools: MiniCPM4-0.5B's real config, and the oracle (a Llama that transformers runs).

    python -m nanovllm.tools.minicpm MINICPM_DIR OUT_DIR

No released transformers has openbmb's ``MiniCPMForCausalLM``, so the oracle is its ``LlamaForCausalLM`` with
MiniCPM's three scalings folded into its weights, written as a Llama checkpoint ``from_pretrained`` loads:
- the embedding times ``scale_emb``;
- ``o_proj`` and ``down_proj`` times ``scale_depth / sqrt(num_hidden_layers)``;
- an untied ``lm_head`` equal to the (unscaled) LM-head weight divided by ``hidden_size / dim_model_base``;
- LongRoPE through transformers' own ``longrope`` rope type.
The formulas are written here from the reference's definition, apart from nanovllm's model (which folds them
differently, ``nanovllm/models/minicpm.py``); only the defaults of fields a config.json omits are the model's.
Weights are folded and saved in float32.  ``MINICPM4_0_5B`` is openbmb/MiniCPM4-0.5B's config.json (its
``auto_map``, ``_name_or_path``, dtype and version fields left out), which ``synthesize minicpm4-0.5b`` writes with
random weights.
"""
import argparse
import json
import math
from pathlib import Path

# MINICPM4_0_5B is read from a public copy of the repository's files, not from the hub; other public code quotes
# the same shape, epsilon and LongRoPE lists.
_MINICPM4_0_5B_ROPE_FACTORS = [  # short_factor and long_factor are this same list
    1.0004360675811768, 1.0668443441390991, 1.1631425619125366, 1.3025742769241333, 1.5040205717086792,
    1.7941505908966064, 2.2101221084594727, 2.802666664123535, 3.6389970779418945, 4.804192543029785,
    6.39855432510376, 8.527148246765137, 11.277542114257812, 14.684998512268066, 18.69317054748535,
    23.13019371032715, 27.72362518310547, 32.1606559753418, 36.168827056884766, 39.57627868652344,
    42.32667541503906, 44.45526885986328, 46.04962921142578, 47.21482849121094, 48.05115509033203,
    48.64370346069336, 49.05967712402344, 49.34980392456055, 49.551246643066406, 49.69068145751953,
    49.78697967529297, 49.85338592529297]
MINICPM4_0_5B = {
    "architectures": ["MiniCPMForCausalLM"], "model_type": "minicpm", "bos_token_id": 1, "eos_token_id": [2, 73440],
    "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.1, "intermediate_size": 4096,
    "max_position_embeddings": 32768, "num_attention_heads": 16, "num_hidden_layers": 24, "num_key_value_heads": 2,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"rope_type": "longrope", "long_factor": _MINICPM4_0_5B_ROPE_FACTORS,
                     "short_factor": _MINICPM4_0_5B_ROPE_FACTORS, "original_max_position_embeddings": 32768},
    "use_cache": True, "vocab_size": 73448, "scale_emb": 12, "dim_model_base": 256, "scale_depth": 1.4,
}
MINICPM4_0_5B_GENERATION = dict(bos=1, eos=[2, 73440], pad=2)  # its generation_config.json's ids
MODEL_TYPES = ("minicpm", "minicpm4")


def with_defaults(cfg: dict) -> dict:
    """``cfg`` with the fields it omits filled as its architecture's config class fills them."""
    from nanovllm.models.registry import resolve_model_class
    return {**getattr(resolve_model_class(cfg), "config_defaults", {}), **cfg}


def llama_config(cfg: dict, tie_word_embeddings: bool = False):
    """transformers' ``LlamaConfig`` of the same shape and rope as the MiniCPM config ``cfg`` (untied by default)."""
    from transformers import LlamaConfig
    rope = dict(cfg.get("rope_scaling") or cfg.get("rope_parameters") or {})
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0)))
    if rope_type == "longrope":
        params = {k: rope[k] for k in ("short_factor", "long_factor", "factor", "attention_factor") if k in rope}
        params["original_max_position_embeddings"] = (rope.get("original_max_position_embeddings")
                                                      or cfg["max_position_embeddings"])
        # transformers picks the factors per forward pass by its largest position.
    elif rope_type == "default":
        params = {}
    else:
        raise ValueError(f"rope type {rope_type!r}: the MiniCPM oracle knows 'default' and 'longrope'")
    heads = cfg["num_attention_heads"]
    return LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
        num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=heads,
        num_key_value_heads=cfg.get("num_key_value_heads") or heads,
        head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
        max_position_embeddings=cfg["max_position_embeddings"], rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_parameters=dict(params, rope_type=rope_type, rope_theta=theta), hidden_act="silu",
        attention_bias=False, mlp_bias=False, tie_word_embeddings=tie_word_embeddings,
        bos_token_id=cfg.get("bos_token_id"), eos_token_id=cfg.get("eos_token_id"))


def folded_state_dict(cfg: dict, state: dict) -> dict:
    """The Llama oracle's float32 weights from a MiniCPM checkpoint's ``state`` (HF names) and config ``cfg``."""
    cfg = with_defaults(cfg)
    depth, base = cfg["scale_depth"], cfg["dim_model_base"]
    residual = 1.0 if depth is None else depth / math.sqrt(cfg["num_hidden_layers"])
    width = 1.0 if base is None else cfg["hidden_size"] / base
    out = {name: t.float() for name, t in state.items()}
    embed = out["model.embed_tokens.weight"]
    head = embed if cfg["tie_word_embeddings"] else out["lm_head.weight"]
    out["lm_head.weight"] = head / width
    out["model.embed_tokens.weight"] = embed * cfg["scale_emb"]
    for name in out:
        if name.rsplit(".", 2)[-2] in ("o_proj", "down_proj"):
            out[name] = out[name] * residual
    return out


def to_llama(minicpm_dir, out_dir) -> Path:
    """Write the oracle for the MiniCPM checkpoint in ``minicpm_dir`` to ``out_dir`` (a Llama checkpoint)."""
    import torch
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from nanovllm.models.loader import checkpoint_files
    cfg = json.loads((Path(minicpm_dir) / "config.json").read_text())
    if cfg.get("model_type") not in MODEL_TYPES:
        raise ValueError(f"{str(minicpm_dir)!r} is not a MiniCPM checkpoint (model_type {cfg.get('model_type')!r}, "
                         f"expected one of {MODEL_TYPES})")
    state = {}
    for path in checkpoint_files(str(minicpm_dir)):
        state.update(load_file(path))
    with torch.device("meta"):
        model = LlamaForCausalLM(llama_config(cfg))
    model.load_state_dict(folded_state_dict(cfg, state), strict=True, assign=True)
    model.save_pretrained(out_dir)
    return Path(out_dir)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m nanovllm.tools.minicpm",
                                description="Write a MiniCPM checkpoint as the equivalent Llama checkpoint (the oracle "
                                            "transformers runs), scalings folded into its float32 weights.")
    p.add_argument("minicpm_dir", metavar="MINICPM_DIR")
    p.add_argument("out_dir", metavar="OUT_DIR")
    args = p.parse_args(argv)
    try:
        print(to_llama(args.minicpm_dir, args.out_dir))
    except ValueError as e:
        p.error(str(e))


if __name__ == "__main__":
    main()
