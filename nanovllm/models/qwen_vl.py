"""Qwen2.5-VL and Qwen3-VL: a vision tower in front of the shared decoder (Qwen2's and Qwen3's), with M-RoPE.

The language model is ``DecoderForCausalLM`` on the checkpoint's text config; its decode steps and text-only
prefill chunks are ordinary steps (positions already shifted by each sequence's ``rope_delta``, ``mrope.py``),
compiled and captured like any text model's.  A prefill chunk that carries image tokens runs eagerly with a
``MultiModalStep``: the image tokens' embeddings are replaced by the tower's output, every token is rotated by its
three-component position, and Qwen3-VL adds its "deepstack" features (from inner tower layers) to the first
decoder layers' outputs at the image tokens.  ``encode_images`` runs the tower (eagerly: image sizes vary), once
per prompt; the runner slices its output per chunk.

Checkpoint names: transformers 5 nests the language model under ``model.language_model.`` and the tower under
``model.visual.``; older Qwen2.5-VL checkpoints use ``model.`` and ``visual.`` (``checkpoint_prefixes``).
"""
from dataclasses import dataclass

import torch

import nanovllm.distributed as distributed
from nanovllm.models.decoder import DecoderForCausalLM
from nanovllm.models.mrope import frequency_components, per_token_tables
from nanovllm.models.qwen25_vision import Qwen25VisionTower
from nanovllm.models.qwen3_vision import Qwen3VisionTower


@dataclass
class MultiModalStep:
    """What a prefill chunk with image tokens adds to its ``StepInputs``: every token's (t, h, w) position
    ``positions3`` [3, T] (padding: 0), the rows of the image tokens ``image_rows`` [n], their embeddings
    ``image_embeds`` [n, H] and, for Qwen3-VL, the deepstack features [n, H] per decoder layer they feed."""
    positions3: torch.Tensor
    image_rows: torch.Tensor
    image_embeds: torch.Tensor
    deepstack: list


def image_step_inputs(body, input_ids: torch.Tensor, inputs, mm: MultiModalStep,
                      components: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """A prefill chunk with image tokens, for a decoder ``body`` (``embed_tokens``, ``rotary``): its embeddings
    with the tower's at the image rows, and (rows, cos, sin) rotating every token by its three-component position
    (``components``: ``mrope.frequency_components``)."""
    x = body.embed_tokens(input_ids)
    x = x.index_copy(0, mm.image_rows, mm.image_embeds.to(x.dtype))
    cos, sin = per_token_tables(body.rotary.cos_cache, body.rotary.sin_cache, mm.positions3, components)
    rows = torch.arange(x.shape[0], device=x.device, dtype=inputs.positions.dtype)
    return x, (rows, cos, sin)


def text_config(hf_config: dict) -> dict:
    """The language model's config: ``text_config`` over the top level (older checkpoints are flat), with the
    M-RoPE keys taken out of the rope settings (``mrope.py`` handles them) and tied embeddings from either."""
    text = {k: v for k, v in hf_config.items() if k not in ("vision_config", "text_config")}
    text.update(hf_config.get("text_config") or {})
    text["tie_word_embeddings"] = bool(hf_config.get("tie_word_embeddings") or text.get("tie_word_embeddings"))
    for key in ("rope_scaling", "rope_parameters"):
        rope = dict(text.get(key) or {})
        if "mrope_section" in rope or rope.get("type") == "mrope" or rope.get("rope_type") == "mrope":
            text["mrope_section"] = rope.pop("mrope_section", None)
            rope.pop("mrope_interleaved", None)
            rope["rope_type"] = "default"
            rope.pop("type", None)
        text[key] = rope or None
    return text


class QwenVLBase(DecoderForCausalLM):
    """A decoder plus ``self.visual``; subclasses set the tower class and the M-RoPE layout."""
    tower_class = None
    interleaved_mrope = False
    default_mrope_section = None
    checkpoint_prefixes = {"model.language_model.": "model.", "model.visual.": "visual."}
    unpacked_prefixes = ("visual.",)  # the tower keeps HF's separate gate/up projections

    def __init__(self, hf_config: dict):
        if distributed.current().size > 1:
            raise ValueError(f"{type(self).__name__} runs at tensor_parallel_size=1 only: the vision tower is not "
                             f"split across ranks yet")
        text = text_config(hf_config)
        super().__init__(text)
        vision = dict(hf_config.get("vision_config") or {})
        self.visual = self.tower_class(vision)
        self.image_token_id = int(hf_config.get("image_token_id", text.get("image_token_id", 151655)))
        self.merge_size = int(vision.get("spatial_merge_size", 2))
        section = text.get("mrope_section") or self.default_mrope_section
        self.register_buffer("mrope_components", frequency_components(self.args.head_dim, list(section),
                                                                      self.interleaved_mrope), persistent=False)

    def encode_images(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, list]:
        """The tower on a prompt's images: (embeddings [image tokens, H], deepstack features: a list, per decoder
        layer they feed, of [image tokens, H]; empty for Qwen2.5-VL)."""
        out = self.visual(pixel_values.to(self.visual_dtype()), grid_thw)
        return out if isinstance(out, tuple) else (out, [])

    def visual_dtype(self) -> torch.dtype:
        return next(self.visual.parameters()).dtype

    def hidden_states(self, input_ids: torch.Tensor, inputs, kv_caches: list, mm: MultiModalStep | None = None):
        if mm is None:
            return super().hidden_states(input_ids, inputs, kv_caches)
        x, rope = image_step_inputs(self.model, input_ids, inputs, mm, self.mrope_components)
        return self.run_layers(x, inputs, kv_caches, rope, (mm.image_rows, mm.deepstack) if mm.deepstack else ())


class Qwen2_5_VLForConditionalGeneration(QwenVLBase):
    qkv_bias = True
    tower_class = Qwen25VisionTower
    default_mrope_section = (16, 24, 24)


class Qwen3VLForConditionalGeneration(QwenVLBase):
    qk_norm = True
    tower_class = Qwen3VisionTower
    interleaved_mrope = True
    default_mrope_section = (24, 20, 20)
