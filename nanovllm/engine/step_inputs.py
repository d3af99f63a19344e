"""``StepInputs``: the whole interface between host and device for one model step.

A pytree of tensors and nothing else, so a compiled step can take it as input and a graph replay can copy
into a static instance.  Rows of a decode batch beyond the live sequences are padding: slot -1 (the KV store
skips it), context length 0 (attention returns zeros) and a sample that is thrown away.

Sampled tokens live in a small device buffer, one row per running sequence (its "token slot"), so a step can
read the token the previous step sampled without a round trip through the host: ``token_slots`` says where
to read an input token, ``out_slots`` where to write each sampled one (the buffer's last row is a
scratch row for padding and for prefill chunks that sample nothing).
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

    def to(self, device) -> "StepInputs":
        return StepInputs(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})

    def copy_into(self, static: "StepInputs") -> None:
        """Copy this batch, already padded to the bucket's shapes, into the static buffers of a graph."""
        for f in fields(self):
            getattr(static, f.name).copy_(getattr(self, f.name), non_blocking=True)


pytree.register_dataclass(StepInputs)
