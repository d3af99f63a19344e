"""Qwen3.5's published checkpoints (``Qwen3_5ForConditionalGeneration`` and ``Qwen3_5MoeForConditionalGeneration``)
with their vision tower: Qwen3-VL's tower without its deepstack mergers (``qwen3_vision.py``) in front of the hybrid
decoder (``hybrid.py``), and Qwen3-VL's interleaved M-RoPE over the full-attention layers' rotary dims.

As for Qwen3-VL (``qwen_vl.py``): decode steps and text-only prefill chunks are the hybrid model's ordinary steps
(positions already shifted by each sequence's ``rope_delta``), compiled and captured; a prefill chunk with image
tokens runs eagerly with a ``MultiModalStep`` (the tower's embeddings at the image tokens, three-component positions).
Under tensor parallelism every rank holds the whole tower (none of its names is split, ``tensor_parallel.py``;
a few hundred MB beside the decoder) and encodes a prompt's images itself: the ranks' requests and steps are
mirrored, so their image steps pair up.  Checkpoint names: ``model.language_model.`` and ``model.visual.``.
"""
import torch

from nanovllm.models.hybrid import Qwen3_5ForCausalLM, Qwen3_5MoeForCausalLM
from nanovllm.models.mrope import frequency_components
from nanovllm.models.qwen3_vision import Qwen3VisionTower
from nanovllm.models.qwen_vl import MultiModalStep, image_step_inputs, text_config
from nanovllm.step import StepInputs

MROPE_SECTION = (11, 11, 10)  # transformers' default for Qwen3.5 (t, h, w frequencies of the rotary dims)


class _WithVision:
    """The tower and the image path over a hybrid decoder (first in the class's bases)."""
    checkpoint_prefixes = {"model.language_model.": "model.", "model.visual.": "visual."}
    unpacked_prefixes = ("visual.",)  # the tower keeps HF's separate projections

    def __init__(self, hf_config: dict):
        super().__init__(hf_config)
        text = text_config(hf_config)
        self.image_token_id = int(hf_config.get("image_token_id", text.get("image_token_id", 248056)))
        vision = dict(hf_config.get("vision_config") or {}, deepstack_visual_indexes=())
        self.merge_size = int(vision.get("spatial_merge_size", 2))
        self.visual = Qwen3VisionTower(vision)
        rotary_dim = self.model.rotary.cos_cache.shape[-1]
        section = list(text.get("mrope_section") or MROPE_SECTION)
        self.register_buffer("mrope_components", frequency_components(rotary_dim, section, True), persistent=False)

    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list]:
        """The tower on a prompt's images: (embeddings [image tokens, H], no deepstack features)."""
        embeds, _ = self.visual(pixel_values.to(next(self.visual.parameters()).dtype), grid_thw)
        return embeds, []

    def hidden_states(self, input_ids: torch.Tensor, inputs: StepInputs, kv_caches: list,
                      mm: MultiModalStep | None = None) -> torch.Tensor:
        if mm is None:
            return super().hidden_states(input_ids, inputs, kv_caches)
        x, rope = image_step_inputs(self.model, input_ids, inputs, mm, self.mrope_components)
        return self.run_layers(x, inputs, kv_caches, rope)


class Qwen3_5ForConditionalGeneration(_WithVision, Qwen3_5ForCausalLM):
    """Qwen3.5 (dense MLPs) with its vision tower."""


class Qwen3_5MoeForConditionalGeneration(_WithVision, Qwen3_5MoeForCausalLM):
    """Qwen3.5-MoE with its vision tower."""
