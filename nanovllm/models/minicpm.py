"""MiniCPM and MiniCPM4: ``MiniCPMForCausalLM`` (openbmb's checkpoints, model_type ``minicpm``) and
``MiniCPM4ForCausalLM`` (transformers' name): the shared decoder (Llama-shaped, no biases) with three scalings
read from config.json, and LongRoPE (``layers/rotary.py``).  The scalings of the reference code:
- the embedding output is multiplied by ``scale_emb``;
- each attention and each MLP branch is multiplied by ``scale_depth / sqrt(num_hidden_layers)`` before it joins
  the residual stream;
- the LM head's input is divided by ``hidden_size / dim_model_base``.

They are folded into the weights once these are loaded (``after_loading``), so the shared decoder runs unchanged:
``embed_tokens`` times ``scale_emb``; ``o_proj`` and ``down_proj`` (and LoRA adapters' products on them:
``lora_targets``) times the residual scale; the final norm's weight divided by the width ratio, and also by
``scale_emb`` when the LM head is tied to the (now scaled) embedding.  The math is the reference's; only where
products are rounded differs.  Fields a config.json leaves out take its architecture's config class's defaults
(``config_defaults``; None means no scaling).  InfLLM-v2 sparse attention (``sparse_config``, MiniCPM4-8B) and
MiniCPM-MoE (``num_experts``) are refused.
"""
import math

import torch

from nanovllm.models.decoder import DecoderForCausalLM


class MiniCPMForCausalLM(DecoderForCausalLM):
    # openbmb's MiniCPMConfig defaults.
    config_defaults = {"scale_emb": 1, "scale_depth": 1, "dim_model_base": 1, "tie_word_embeddings": True}

    def __init__(self, hf_config: dict):
        cfg = {**self.config_defaults, **hf_config}
        _refuse_unsupported(cfg)
        super().__init__(cfg)
        self.embed_scale = float(cfg["scale_emb"])
        depth, base = cfg["scale_depth"], cfg["dim_model_base"]
        self.residual_scale = 1.0 if depth is None else depth / math.sqrt(cfg["num_hidden_layers"])
        self.head_input_divisor = 1.0 if base is None else cfg["hidden_size"] / base
        self.scales_folded = False

    @torch.no_grad()
    def after_loading(self) -> None:
        """Fold the three scalings into the loaded weights (once)."""
        assert not self.scales_folded, "MiniCPM scalings are already folded into these weights"
        self.scales_folded = True
        if self.embed_scale != 1.0:
            self.model.embed_tokens.weight.mul_(self.embed_scale)
        divisor = self.head_input_divisor * (self.embed_scale if self.args.tie_word_embeddings else 1.0)
        if divisor != 1.0:
            self.model.norm.weight.div_(divisor)
        if self.residual_scale != 1.0:
            for branch_out in self._branch_outs():
                scale = getattr(branch_out, "weight_scale", None)  # an FP8 weight's (quant/fp8_weights.py)
                (branch_out.weight if scale is None else scale).mul_(self.residual_scale)
                if branch_out.bias is not None:
                    branch_out.bias.mul_(self.residual_scale)

    def _branch_outs(self) -> list[torch.nn.Linear]:
        """The projections whose outputs join the residual stream: each layer's ``o_proj`` and ``down_proj``."""
        return [m for layer in self.model.layers for m in (layer.self_attn.o_proj, layer.mlp.down_proj)]

    def lora_targets(self) -> list:
        """The decoder's, an adapter's product on ``o_proj`` and ``down_proj`` times the residual scale as their
        weights are (openbmb's model scales the branch output, adapter included)."""
        scaled = set(map(id, self._branch_outs()))
        return [[t._replace(scale=self.residual_scale) if id(t.linear) in scaled else t for t in targets]
                for targets in super().lora_targets()]


class MiniCPM4ForCausalLM(MiniCPMForCausalLM):
    # transformers' MiniCPM4Config defaults.
    config_defaults = {"scale_emb": 12, "scale_depth": 1.4, "dim_model_base": 256, "tie_word_embeddings": True}


def _refuse_unsupported(cfg: dict) -> None:
    if cfg.get("sparse_config"):
        raise NotImplementedError(
            f"MiniCPM4's InfLLM-v2 sparse attention is not supported: config.json sets "
            f"sparse_config={cfg['sparse_config']!r}; delete that key to run the model with dense attention only")
    if cfg.get("num_experts"):
        raise NotImplementedError(f"MiniCPM mixture-of-experts checkpoints are not supported: config.json sets "
                                  f"num_experts={cfg['num_experts']!r}; only dense MiniCPM checkpoints run")
