"""``StepInputs``: the whole interface between host and device for one model step.

A pytree of tensors and nothing else, so a compiled step can take it as input and a graph replay can copy
into a static instance.  Rows of a decode batch beyond the live sequences are padding: slot -1 (the KV store
skips it), context length 0 (attention returns zeros) and a sample that is thrown away.

Sampled tokens live in a small device buffer, one row per running sequence (its "token slot"), so a step can
read the token the previous step sampled without a round trip through the host: ``token_slots`` says where
to read an input token, ``out_slots`` where to write each sampled one (the buffer's last row is a
scratch row for padding and for prefill chunks that sample nothing).

A packed instance (``StepInputs.packed``) keeps all its tensors as views of one byte buffer, so that moving it
between host and device, or into a graph's static inputs packed the same way, is one copy instead of one per
field.  Each small copy costs the device a few microseconds between two decode steps.
"""
from dataclasses import dataclass, fields

import torch
import torch.utils._pytree as pytree


@dataclass
class StepInputs:
    input_ids: torch.Tensor       # [T] int64, the tokens to compute this step (where token_slots is -1)
    token_slots: torch.Tensor     # [T] int64, token-buffer row holding the input token instead, or -1
    positions: torch.Tensor       # [T] int64, their absolute positions
    slot_mapping: torch.Tensor    # [T] int64, KV slot of each token (-1: padding)
    block_tables: torch.Tensor    # [B, M] int32, KV blocks of each sequence
    context_lens: torch.Tensor    # [B] int32, KV tokens of each sequence after this step (0: padding)
    cu_seqlens_q: torch.Tensor    # [B+1] int32, offsets of each sequence's tokens in input_ids
    logits_indices: torch.Tensor  # [B] int64, the row of input_ids whose logits are sampled
    temperature: torch.Tensor     # [B] float32, 0 means greedy
    top_k: torch.Tensor           # [B] int64, -1 means off
    top_p: torch.Tensor           # [B] float32, 1 means off
    seeds: torch.Tensor           # [B] int64, per-request noise seed
    sample_positions: torch.Tensor  # [B] int64, index of the token being drawn (keys the noise)
    out_slots: torch.Tensor       # [B] int64, token-buffer row that receives each sampled token

    @classmethod
    def packed(cls, like: "StepInputs", device=None, pin_memory: bool = False) -> "StepInputs":
        """Zeroed inputs with the shapes and dtypes of ``like``, all views of one byte buffer on ``device``."""
        layout, size = _layout(like)
        buffer = torch.zeros(size, dtype=torch.uint8, device=device, pin_memory=pin_memory)
        return cls._views(buffer, layout)

    @classmethod
    def _views(cls, buffer: torch.Tensor, layout: list) -> "StepInputs":
        inputs = cls(**{name: buffer[start:start + nbytes].view(dtype).view(shape)
                        for name, dtype, shape, start, nbytes in layout})
        inputs.buffer, inputs.layout = buffer, layout  # not fields: a compiled step never sees them
        return inputs

    def packed_copy(self, pin_memory: bool = False) -> "StepInputs":
        """These values in a new packed instance on the host (pinned if asked), to move in one copy."""
        out = StepInputs.packed(self, pin_memory=pin_memory)
        for f in fields(self):
            getattr(out, f.name).copy_(getattr(self, f.name))
        return out

    def to(self, device) -> "StepInputs":
        if getattr(self, "buffer", None) is not None:
            return self._views(self.buffer.to(device, non_blocking=True), self.layout)
        return StepInputs(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})

    def copy_into(self, static: "StepInputs") -> None:
        """Copy this batch, already padded to the bucket's shapes, into the static buffers of a graph."""
        if getattr(self, "buffer", None) is not None and getattr(static, "layout", None) == self.layout:
            static.buffer.copy_(self.buffer, non_blocking=True)
            return
        for f in fields(self):
            getattr(static, f.name).copy_(getattr(self, f.name), non_blocking=True)


_ALIGN = 64  # bytes: every view starts aligned, as the compiled kernels assume of their inputs


def _layout(like: StepInputs) -> tuple[list, int]:
    """[(field, dtype, shape, byte offset, bytes)] of a packed ``StepInputs`` shaped like ``like``, and its size."""
    layout, offset = [], 0
    for f in fields(like):
        t = getattr(like, f.name)
        nbytes = t.numel() * t.element_size()
        layout.append((f.name, t.dtype, tuple(t.shape), offset, nbytes))
        offset += -(-nbytes // _ALIGN) * _ALIGN
    return layout, max(offset, _ALIGN)


pytree.register_dataclass(StepInputs)
