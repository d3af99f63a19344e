"""The extra inputs of a prefill chunk that carries image tokens (vision-language models): a ``MultiModalStep``.

A prompt's images go through the model's vision tower once, when its first chunk that reaches an image token is
scheduled (the prompts of one step that need it share one tower call); the output stays with the sequence
(``ImageInputs.encoded``) until its last image token is prefilled, so a prompt chunked in the middle of an image
takes the rest of that image's rows in a later step.  A preempted sequence encodes again when it is readmitted.

Token rows follow ``PrefillInputBuilder.build`` (unpadded): each sequence's chunk in batch order, then padding,
whose (t, h, w) position is 0.
"""
import numpy as np
import torch

from nanovllm.models.qwen_vl import MultiModalStep


def carries_images(batch) -> bool:
    """Whether a scheduled prefill reaches some prompt's image tokens."""
    return any(seq.images is not None and _overlaps(seq, n) for seq, n in zip(batch.seqs, batch.num_new_tokens))


def _overlaps(seq, n: int) -> bool:
    start = seq.num_computed_tokens
    return any(first < start + n and first + count > start for first, count in seq.images.spans)


def _encode(model, seqs: list, device: torch.device) -> None:
    """Run the tower once on the images of ``seqs`` and keep each one's (embeddings, deepstack) on it."""
    pixels = torch.cat([s.images.pixel_values for s in seqs]).to(device, non_blocking=True)
    grids = torch.tensor([g for s in seqs for g in s.images.grid_thw], dtype=torch.int64, device=device)
    embeds, deepstack = model.encode_images(pixels, grids)
    counts = [sum(n for _, n in s.images.spans) for s in seqs]
    assert sum(counts) == embeds.shape[0], f"the tower gave {embeds.shape[0]} image tokens, prompts hold {counts}"
    for i, seq in enumerate(seqs):
        lo, hi = sum(counts[:i]), sum(counts[:i + 1])
        seq.images.encoded = (embeds[lo:hi], [d[lo:hi] for d in deepstack])


def build(model, batch, num_tokens: int, device: torch.device) -> MultiModalStep:
    """The ``MultiModalStep`` of a prefill ``batch`` laid out in ``num_tokens`` rows (``carries_images`` is
    True)."""
    todo = [s for s, n in zip(batch.seqs, batch.num_new_tokens)
            if s.images is not None and s.images.encoded is None and _overlaps(s, n)]
    if todo:
        _encode(model, todo, device)
    positions3 = np.zeros((3, num_tokens), np.int64)
    rows, parts, deep_parts, offset = [], [], [], 0
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        start = seq.num_computed_tokens
        positions3[:, offset:offset + n] = seq.rope_positions(start, n)
        images = seq.images
        if images is not None:
            prompt = images.positions3
            inside = min(start + n, prompt.shape[1]) - start
            if inside > 0:
                positions3[:, offset:offset + inside] = prompt[:, start:start + inside]
            seen = 0  # image tokens of the prompt before this image
            for first, count in images.spans:
                lo, hi = max(first, start), min(first + count, start + n)
                if lo < hi:
                    embeds, deep = images.encoded
                    rows.append(np.arange(lo, hi) - start + offset)
                    parts.append(embeds[seen + lo - first:seen + hi - first])
                    deep_parts.append([d[seen + lo - first:seen + hi - first] for d in deep])
                seen += count
            if start + n >= images.end:
                images.encoded = None  # every image token is prefilled: the tower's output is no longer needed
        offset += n
    layers = len(deep_parts[0]) if deep_parts else 0
    return MultiModalStep(
        positions3=torch.from_numpy(positions3).to(device, non_blocking=True),
        image_rows=torch.from_numpy(np.concatenate(rows)).to(device, non_blocking=True),
        image_embeds=torch.cat(parts),
        deepstack=[torch.cat([p[i] for p in deep_parts]) for i in range(layers)])
