"""``StepInputs``: the whole interface between host and device for one model step.

A pytree of tensors and nothing else, so a compiled step can take it as input and a graph replay can copy into a
static instance.  Padding is defined once, here (``PADDING``): a padded token has slot -1 (the KV store skips it)
and adapter slot 0, a padded sequence row context length 0 (attention returns zeros), is greedy, and samples into
the token buffer's scratch row.  Builders fill real rows and call ``pad_rows``.

Sampled tokens live in a small device buffer, one row per running sequence (its "token slot"), so a step reads the
token the previous step sampled without a round trip through the host: ``token_slots`` says where to read an input
token, ``out_slots`` where to write each sampled one (the last row: a scratch row for padding and chunks that sample
nothing); ``state_slots`` each row's slot in a hybrid model's state pools (``capture_*``: a snapshot inside the step,
``state_chain``: a verify step's rows chained, ``engine/hybrid_state.py``), ``lora_slots`` each token's LoRA adapter
slot; ``WindowStepInputs`` adds a window pool's tables and slots (``kv_tables``).

A packed instance (``StepInputs.packed``) is views of one byte buffer: to the device or a graph's inputs, one copy.
"""
from dataclasses import dataclass, fields

import numpy as np
import torch
import torch.utils._pytree as pytree

# Value of each per-token / per-row field in a padding position.  ``out_slots`` pads to the scratch row, whose
# index depends on the engine (``max_num_seqs``); ``cu_seqlens_q`` and ``logits_indices`` describe the layout.
PADDING = {"input_ids": 0, "token_slots": -1, "positions": 0, "slot_mapping": -1, "block_tables": 0,
           "context_lens": 0, "temperature": 0.0, "top_k": -1, "top_p": 1.0, "min_p": 0.0, "seeds": 0,
           "sample_positions": 0, "window_tables": 0, "window_slot_mapping": -1, "lora_slots": 0, "capture_lens": 0,
           "state_chain": 1}
# dtype of every field: int64 ids, slots and positions; int32 block tables, lengths and offsets.
DTYPES = {"input_ids": torch.int64, "token_slots": torch.int64, "positions": torch.int64,
          "slot_mapping": torch.int64, "block_tables": torch.int32, "context_lens": torch.int32,
          "cu_seqlens_q": torch.int32, "logits_indices": torch.int64, "temperature": torch.float32,
          "top_k": torch.int64, "top_p": torch.float32, "min_p": torch.float32, "seeds": torch.int64,
          "sample_positions": torch.int64,
          "out_slots": torch.int64, "state_slots": torch.int64, "lora_slots": torch.int64,
          "capture_slots": torch.int64, "capture_lens": torch.int64, "state_chain": torch.int64}
# ... and of the fields only ``WindowStepInputs`` has
WINDOW_DTYPES = {"window_tables": torch.int32, "window_slot_mapping": torch.int64}
_PER_TOKEN = ("input_ids", "token_slots", "positions", "slot_mapping", "window_slot_mapping", "lora_slots")
_TABLES = ("block_tables", "window_tables")


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
    min_p: torch.Tensor           # [B] float32, 0 means off
    seeds: torch.Tensor           # [B] int64, per-request noise seed
    sample_positions: torch.Tensor  # [B] int64, index of the token being drawn (keys the noise)
    out_slots: torch.Tensor       # [B] int64, token-buffer row that receives each sampled token
    state_slots: torch.Tensor     # [B] int64, each row's slot of a hybrid model's state pools (its token slot)
    lora_slots: torch.Tensor      # [T] int64, each token's LoRA adapter slot (0: none; kernels/lora)
    capture_slots: torch.Tensor   # [B] int64, a hybrid model's snapshot slot that takes the row's states ...
    capture_lens: torch.Tensor    # [B] int64, ... after its first this many tokens of the step (0: none)
    state_chain: torch.Tensor     # [B] int64, a verify step's rows of one sequence: n at its first, 0 after (1: alone)

    @classmethod
    def dtypes(cls) -> dict:
        """Every field's dtype, by name, in field order."""
        return DTYPES

    def kv_tables(self, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(block tables, slot mapping) of a layer of sliding window ``window`` (0: full attention): here the one
        pool's for every layer."""
        return self.block_tables, self.slot_mapping

    @classmethod
    def shaped(cls, tokens: int, rows: int, table_width: int, device="meta") -> "StepInputs":
        """Uninitialised inputs of ``tokens`` tokens in ``rows`` sequence rows (``meta``: shapes only)."""
        def shape(name):
            if name in _PER_TOKEN:
                return (tokens,)
            if name in _TABLES:
                return (rows, table_width)
            return (rows + 1,) if name == "cu_seqlens_q" else (rows,)
        return cls(**{name: torch.empty(shape(name), dtype=dtype, device=device)
                      for name, dtype in cls.dtypes().items()})

    @classmethod
    def from_arrays(cls, **arrays) -> "StepInputs":
        """Host tensors from numpy arrays (or lists) named by field, each converted to its field's dtype."""
        missing = cls.dtypes().keys() - arrays.keys()
        assert not missing, f"{cls.__name__}.from_arrays lacks {sorted(missing)}"
        return cls(**{name: torch.from_numpy(np.ascontiguousarray(arrays[name])).to(dtype)
                      for name, dtype in cls.dtypes().items()})

    def pad_rows(self, first_token: int, first_row: int, scratch_slot: int) -> None:
        """Make tokens from ``first_token`` and sequence rows from ``first_row`` padding (``PADDING``), in place.
        Host tensors only; ``cu_seqlens_q`` and ``logits_indices`` are the builder's."""
        for name, value in self._padding().items():  # numpy views: a few microseconds, every decode step
            getattr(self, name).numpy()[first_token if name in _PER_TOKEN else first_row:] = value
        self.out_slots.numpy()[first_row:] = scratch_slot
        self.state_slots.numpy()[first_row:] = scratch_slot
        self.capture_slots.numpy()[first_row:] = scratch_slot

    @classmethod
    def _padding(cls) -> dict:
        return _BASE_PADDING

    @classmethod
    def packed(cls, like: "StepInputs", device=None, pin_memory: bool = False) -> "StepInputs":
        """Zeroed inputs with the shapes and dtypes of ``like``, all views of one byte buffer on ``device`` (each
        small copy would cost the device a few microseconds between two decode steps)."""
        layout, size = _layout(like)
        buffer = torch.zeros(size, dtype=torch.uint8, device=device, pin_memory=pin_memory)
        return type(like)._views(buffer, layout)  # a ``WindowStepInputs`` stays one

    @classmethod
    def _views(cls, buffer: torch.Tensor, layout: list) -> "StepInputs":
        inputs = cls(**{name: buffer[start:start + nbytes].view(dtype).view(shape)
                        for name, dtype, shape, start, nbytes in layout})
        inputs.buffer, inputs.layout = buffer, layout  # not fields: a compiled step never sees them
        return inputs

    def packed_copy(self, pin_memory: bool = False) -> "StepInputs":
        """These values in a new packed instance on the host (pinned if asked), to move in one copy."""
        out = type(self).packed(self, pin_memory=pin_memory)
        for f in fields(self):
            getattr(out, f.name).copy_(getattr(self, f.name))
        return out

    def clone(self) -> "StepInputs":
        """A copy on the same device (packed if this is), which later writes to this one leave alone."""
        if getattr(self, "buffer", None) is not None:
            return self._views(self.buffer.clone(), self.layout)
        return type(self)(**{f.name: getattr(self, f.name).clone() for f in fields(self)})

    def to(self, device) -> "StepInputs":
        if getattr(self, "buffer", None) is not None:
            return self._views(self.buffer.to(device, non_blocking=True), self.layout)
        return type(self)(**{f.name: getattr(self, f.name).to(device, non_blocking=True) for f in fields(self)})

    def copy_into(self, static: "StepInputs") -> None:
        """Copy this batch, already padded to the bucket's shapes, into the static buffers of a graph."""
        if getattr(self, "buffer", None) is not None and getattr(static, "layout", None) == self.layout:
            static.buffer.copy_(self.buffer, non_blocking=True)
            return
        for f in fields(self):
            getattr(static, f.name).copy_(getattr(self, f.name), non_blocking=True)


@dataclass
class WindowStepInputs(StepInputs):
    """``StepInputs`` of an engine whose sliding-window layers keep their KV in a pool of their own
    (``engine/window_blocks.py``): for those layers ``window_tables`` and ``window_slot_mapping``, the same logical
    blocks in the window pool (entries of blocks no query of the step can see are 0).  Models without windows keep
    ``StepInputs`` as it was."""
    window_tables: torch.Tensor        # [B, M] int32, window-pool blocks of each sequence (0: not held)
    window_slot_mapping: torch.Tensor  # [T] int64, window-pool KV slot of each token (-1: padding)

    @classmethod
    def dtypes(cls) -> dict:
        return _WINDOWED

    @classmethod
    def _padding(cls) -> dict:
        return PADDING

    def kv_tables(self, window: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The window pool's (tables, slot mapping) for a sliding layer, the full pool's for the others."""
        return (self.window_tables, self.window_slot_mapping) if window else (self.block_tables, self.slot_mapping)


_WINDOWED = {**DTYPES, **WINDOW_DTYPES}
_BASE_PADDING = {name: value for name, value in PADDING.items() if name in DTYPES}
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
pytree.register_dataclass(WindowStepInputs)
