"""Multimodal rotary positions (M-RoPE) of the Qwen vision-language models.

A token's position has three components (t, h, w).  A text token has all three equal, so its rotation is the
plain 1-D rope of that position; an image token gets (its image's start, start + row, start + column) on the
merged patch grid, and the text after an image continues from ``start + max(rows, columns)``.  So a sequence's
positions fall behind its token count by ``rope_delta`` (≤ 0) once its prompt's images are behind it: decode
positions stay 1-D, ``token index + rope_delta``, and decode graphs keep their static shapes.

Host side, ``prompt_positions`` computes a prompt's [3, P] positions and its delta.  Device side, only a prefill
chunk that carries image tokens needs the three components: ``per_token_tables`` gathers each frequency's
cos/sin from the component that frequency follows (``frequency_components``: contiguous sections in
Qwen2.5-VL, interleaved t/h/w in Qwen3-VL), giving per-token tables that the rope op reads by token index.
"""
import numpy as np
import torch


def prompt_positions(token_ids, image_token_id: int, grids: list[tuple[int, int, int]],
                     merge: int) -> tuple[np.ndarray, int]:
    """([3, P] int64 positions, rope_delta) of a prompt whose runs of ``image_token_id`` are its images' tokens,
    one run per entry of ``grids`` ((t, h, w) in patches, before the ``merge`` × ``merge`` merge), in order."""
    ids = np.asarray(token_ids)
    out = np.empty((3, len(ids)), np.int64)
    is_image = ids == image_token_id
    starts = np.flatnonzero(is_image & ~np.concatenate(([False], is_image[:-1])))
    assert len(starts) == len(grids), "one run of image tokens per image"
    cursor, done = 0, 0  # next text position; tokens placed so far
    for start, (t, h, w) in zip(starts, grids):
        n_text = start - done
        out[:, done:start] = cursor + np.arange(n_text)
        cursor += n_text
        gh, gw = h // merge, w // merge
        n = t * gh * gw
        tt, hh, ww = np.meshgrid(np.arange(t), np.arange(gh), np.arange(gw), indexing="ij")
        out[:, start:start + n] = cursor + np.stack([tt.ravel(), hh.ravel(), ww.ravel()])
        cursor += max(gh, gw)
        done = start + n
    out[:, done:] = cursor + np.arange(len(ids) - done)
    return out, int(out.max()) + 1 - len(ids) if len(ids) else 0


def frequency_components(head_dim: int, section: list[int], interleaved: bool) -> torch.Tensor:
    """[head_dim] int64: which component (0 t, 1 h, 2 w) each rotary dimension's frequency follows.  The
    rotate-half tables repeat the head_dim/2 frequencies twice, so the map does too."""
    half = head_dim // 2
    if sum(section) != half:
        raise ValueError(f"mrope_section {section} must sum to head_dim/2 = {half}")
    if interleaved:  # t h w t h w ... while each of h and w has frequencies left, then t
        comp = torch.zeros(half, dtype=torch.int64)
        for c in (1, 2):
            comp[c:3 * section[c]:3] = c
    else:
        comp = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(section)])
    return torch.cat([comp, comp])


def per_token_tables(cos_cache: torch.Tensor, sin_cache: torch.Tensor, positions3: torch.Tensor,
                     components: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin [T, head_dim] of tokens at ``positions3`` [3, T], each frequency from its component."""
    index = components.to(positions3.device).view(1, 1, -1).expand(1, positions3.shape[1], -1)
    return (cos_cache[positions3].gather(0, index).squeeze(0), sin_cache[positions3].gather(0, index).squeeze(0))
