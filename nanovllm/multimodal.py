"""Prompts with images, vLLM's way: ``{"prompt": text, "multi_modal_data": {"image": img}}`` -> token ids and the
engine's ``ImageInputs``.

``img`` is a ``PIL.Image``, a path, or a list of them.  The text holds the model's placeholder
``<|vision_start|><|image_pad|><|vision_end|>`` once per image, as the chat template writes it; each run of
``<|image_pad|>`` becomes as many copies as the image has tokens (patches / merge²).  A dict prompt may give
``prompt_token_ids`` instead of ``prompt``.  Images are preprocessed by transformers' Qwen2-VL image processor
on its PIL backend (resize to the checkpoint's pixel bounds, normalise, patchify): it works without torchvision,
which has no build matching the CPU torch wheel; ``preprocessor_config.json`` gives its settings.

``chat_prompt`` turns OpenAI-style messages whose content lists ``{"type": "image", "image": ...}`` parts into
plain-text messages with the placeholder, for any chat template, and returns their images in order.
"""
import os

import numpy as np
import xxhash

from nanovllm.engine.sequence import ImageInputs
from nanovllm.models.mrope import prompt_positions

PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


class ImagePrompts:
    """Turns dict prompts into (token ids, ``ImageInputs``) for one vision-language checkpoint."""

    def __init__(self, model_dir: str, hf_config: dict, tokenizer):
        vision = hf_config["vision_config"]
        self.image_token_id = int(hf_config.get("image_token_id", 151655))
        self.merge = int(vision.get("spatial_merge_size", 2))
        self.tokenizer = tokenizer
        self.processor = _image_processor(model_dir, vision)

    def encode(self, prompt: dict, index: int) -> tuple[list[int], ImageInputs | None]:
        images = _as_list((prompt.get("multi_modal_data") or {}).get("image"))
        if "prompt_token_ids" in prompt:
            ids = list(prompt["prompt_token_ids"])
        elif isinstance(prompt.get("prompt"), str):
            if self.tokenizer is None:
                raise ValueError(f"prompt {index} is text but the model has no tokenizer; give prompt_token_ids")
            ids = self.tokenizer.encode(prompt["prompt"])
        else:
            raise TypeError(f"prompt {index} is a dict without a 'prompt' string or 'prompt_token_ids' list")
        runs = _runs(ids, self.image_token_id)
        if len(runs) != len(images):
            raise ValueError(f"prompt {index} has {len(runs)} image placeholder(s) ({PLACEHOLDER}) but "
                             f"{len(images)} image(s) in multi_modal_data")
        if not images:
            return ids, None
        pixels = [self.preprocess(img, index, j) for j, img in enumerate(images)]
        grids = [tuple(int(v) for v in grid) for _, grid in pixels]
        out, spans = [], []
        cursor = 0
        for (first, count), (t, h, w) in zip(runs, grids):
            out += ids[cursor:first]
            n = t * h * w // self.merge ** 2
            spans.append((len(out), n))
            out += [self.image_token_id] * n
            cursor = first + count
        out += ids[cursor:]
        positions3, delta = prompt_positions(out, self.image_token_id, grids, self.merge)
        import torch
        values = torch.cat([torch.as_tensor(np.asarray(p), dtype=torch.float32) for p, _ in pixels])
        hashes = [_content_hash(np.asarray(p), grid) for p, grid in zip((p for p, _ in pixels), grids)]
        return out, ImageInputs(values, grids, spans, hashes, positions3, delta)

    def preprocess(self, image, index: int, j: int):
        """(pixel patches [n, C*T*P*P], grid (t, h, w)) of one image; an unreadable one raises ``ValueError``."""
        try:
            image = _open(image)
            got = self.processor(images=[image], return_tensors="np")
        except (OSError, ValueError, TypeError, AttributeError) as e:
            raise ValueError(f"prompt {index}: image {j} cannot be read ({type(e).__name__}: {e})") from e
        return got["pixel_values"], got["image_grid_thw"][0]


def chat_prompt(messages: list[dict]) -> tuple[list[dict], list]:
    """Messages with image parts -> (the same messages with string contents, placeholders where the images were;
    the images in order)."""
    out, images = [], []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            text = []
            for part in content:
                kind = part.get("type")
                if kind == "text":
                    text.append(part["text"])
                elif kind in ("image", "image_url") or "image" in part:
                    images.append(_part_image(part))
                    text.append(PLACEHOLDER)
                else:
                    raise ValueError(f"message content part of type {kind!r}: only 'text' and 'image' are supported")
            m = dict(m, content="".join(text))
        out.append(m)
    return out, images


def _part_image(part: dict):
    if "image" in part:
        return part["image"]
    url = part["image_url"].get("url") if isinstance(part.get("image_url"), dict) else part.get("image_url")
    if not isinstance(url, str):
        raise ValueError(f"an image_url part needs image_url.url (a data: URL or a local path), got {part!r}")
    if isinstance(url, str) and url.startswith("data:"):
        import base64
        import io
        return io.BytesIO(base64.b64decode(url.split(",", 1)[1]))
    return url.removeprefix("file://") if isinstance(url, str) else url


def _runs(ids: list[int], token: int) -> list[tuple[int, int]]:
    """(start, length) of each maximal run of ``token`` in ``ids``."""
    runs, i = [], 0
    while i < len(ids):
        if ids[i] == token:
            j = i
            while j < len(ids) and ids[j] == token:
                j += 1
            runs.append((i, j - i))
            i = j
        else:
            i += 1
    return runs


def _as_list(images) -> list:
    if images is None:
        return []
    return list(images) if isinstance(images, (list, tuple)) else [images]


def _open(image):
    from PIL import Image
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)) or hasattr(image, "read"):
        with Image.open(image) as img:
            return img.convert("RGB")
    raise TypeError(f"an image must be a PIL.Image or a path, got {type(image).__name__}")


def _content_hash(pixels: np.ndarray, grid: tuple) -> int:
    h = xxhash.xxh64()
    h.update(np.asarray(grid, np.int64).tobytes())
    h.update(np.ascontiguousarray(pixels, dtype=np.float32).tobytes())
    return h.intdigest() & (2**63 - 1)


def _image_processor(model_dir: str, vision: dict):
    """The checkpoint's image processor on the PIL backend (``preprocessor_config.json``; defaults from the
    vision config where it has none)."""
    import json
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    except ImportError:  # transformers before the PIL backend's split: this class is the PIL one
        from transformers import Qwen2VLImageProcessor as Qwen2VLImageProcessorPil
    path = os.path.join(model_dir, "preprocessor_config.json")
    settings = {}
    if os.path.isfile(path):
        with open(path) as f:
            settings = json.load(f)
    else:
        settings = {"patch_size": vision.get("patch_size", 14), "merge_size": vision.get("spatial_merge_size", 2),
                    "temporal_patch_size": vision.get("temporal_patch_size", 2)}
    settings = {k: v for k, v in settings.items() if k not in ("image_processor_type", "processor_class")}
    return Qwen2VLImageProcessorPil(**settings)
