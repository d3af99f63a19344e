"""Builds decode ``StepInputs`` with little host work per step (decode input preparation is on the critical path):
* each sequence's padded block-table row and sampling settings are kept between steps and only the new
  blocks are written (a sequence whose ``block_table`` list was replaced, e.g. after preemption, is rebuilt);
* a batch of the same sequences as the last one of its row count, one step later (the common case), reuses
  that batch's block-table matrix and sampling settings, updating only the rows that just got a new block;
* the batch is assembled with numpy in reusable staging tensors, views of one (pinned on CUDA) buffer, so
  it reaches the device, or a graph's static inputs, in one copy (``StepInputs.packed``);
* one staging set per (row count, chunk of the step, pipeline slot): a set's asynchronous copy to the device
  may still be pending while later chunks and the next steps are prepared; ``StepPipeline`` hands a slot out
  again only after the step that last used it was collected;
* on a capturing platform the staging tensors are copied straight into the graph's static input buffers.

A window pool's tables (``window``: its W) are kept alike: a row changes where a block opens or leaves the window.
Padded rows are ``StepInputs.pad_rows``'s.  A sequence whose newest token is still ``PENDING_TOKEN`` reads it
from its token slot on the device.
"""
import numpy as np
import torch

from nanovllm.step import StepInputs, WindowStepInputs


class _SeqRow:
    __slots__ = ("table_list", "row", "filled", "params", "seed", "rope_delta")

    def __init__(self, seq, width: int):
        self.table_list = seq.block_table
        self.row = np.zeros(width, np.int32)
        self.filled = 0
        self.params = seq.params
        self.seed = seq.seed
        self.rope_delta = seq.rope_delta


class _Batch:
    """One row count's last batch: its sequences, their block-table lists and lengths, and the arrays built
    (``tables`` [n, width], the per-row sampling fields ``temperature``, ``top_k``, ``top_p``, ``min_p``,
    ``seeds``, and ``rope_delta``, each row's position minus its token index: nonzero after images, ``mrope.py``);
    with a window pool also their window-table lists and ``window_tables`` [n, width]."""
    __slots__ = ("seqs", "table_lists", "lens", "tables", "temperature", "top_k", "top_p", "min_p", "seeds",
                 "rope_delta", "window_lists", "window_tables")

    def __init__(self, seqs, table_lists, lens, tables, entries, window_lists=None, window_tables=None):
        self.seqs, self.table_lists, self.lens, self.tables = seqs, table_lists, lens, tables
        self.window_lists, self.window_tables = window_lists, window_tables
        n = len(entries)
        self.temperature = np.fromiter((e.params.temperature for e in entries), np.float32, n)
        self.top_k = np.fromiter((e.params.top_k for e in entries), np.int64, n)
        self.top_p = np.fromiter((e.params.top_p for e in entries), np.float32, n)
        self.min_p = np.fromiter((e.params.min_p for e in entries), np.float32, n)
        self.seeds = np.fromiter((e.seed for e in entries), np.int64, n)
        self.rope_delta = np.fromiter((e.rope_delta for e in entries), np.int64, n)


class DecodeInputBuilder:
    def __init__(self, *, device: torch.device, pin_memory: bool, block_size: int, table_width: int,
                 scratch_slot: int, window: int = 0):
        self.device, self.pin_memory = device, pin_memory
        self.window = window  # the window pool's W, 0 without one
        self.scratch_slot = scratch_slot
        self.block_size = block_size
        self.width = table_width
        self._rows: dict[int, _SeqRow] = {}
        self._staging: dict[tuple, StepInputs] = {}  # (rows, slot) -> pinned staging set
        self._batches: dict[tuple, _Batch] = {}  # (rows, chunk) -> its last batch

    def staging_for(self, rows: int, slot: tuple) -> StepInputs:
        """The packed host set of ``rows`` decode rows for ``slot`` (a key of the caller's: chunk and pipeline
        slot), one token per row (``cu_seqlens_q`` and ``logits_indices`` filled); made once, then reused."""
        key = (rows, slot)
        if key not in self._staging:
            with torch.inference_mode():  # one pinned buffer: the set reaches the device in one copy
                kind = WindowStepInputs if self.window else StepInputs
                host = StepInputs.packed(kind.shaped(rows, rows, self.width), pin_memory=self.pin_memory)
                host.cu_seqlens_q.copy_(torch.arange(rows + 1, dtype=torch.int32))
                host.logits_indices.copy_(torch.arange(rows))
            self._staging[key] = host
        return self._staging[key]

    def _row(self, seq) -> _SeqRow:
        entry = self._rows.get(seq.seq_id)
        if entry is None or entry.table_list is not seq.block_table:
            entry = self._rows[seq.seq_id] = _SeqRow(seq, self.width)
        table = seq.block_table
        if entry.filled < len(table):
            entry.row[entry.filled:len(table)] = table[entry.filled:]
            entry.filled = len(table)
        return entry

    def _batch(self, seqs: list, lens: np.ndarray, key: tuple) -> _Batch:
        """The block tables [n, width] and sampling settings of ``seqs``: the last batch of ``key`` one decode step
        later (same sequences, same block-table lists, each one token longer), or built anew."""
        table_lists = [s.block_table for s in seqs]
        window_lists = [s.window_table for s in seqs] if self.window else None
        last = self._batches.get(key)
        if (last is not None and last.seqs == seqs and last.table_lists == table_lists
                and last.window_lists == window_lists and np.array_equal(last.lens + 1, lens)):
            pos = lens - 1
            for i in np.flatnonzero(pos % self.block_size == 0):  # the rows whose newest token opened a block
                b = pos[i] // self.block_size
                last.tables[i, b] = table_lists[i][b]
                if window_lists is not None:
                    last.window_tables[i, b] = window_lists[i][b]
            if window_lists is not None:  # the rows whose window left a block (given back: NULL in the list)
                start = pos - self.window + 1
                for i in np.flatnonzero((start > 0) & (start % self.block_size == 0)):
                    b = start[i] // self.block_size - 1
                    last.window_tables[i, b] = window_lists[i][b]
            last.lens = lens
            return last
        if len(self._rows) > 4 * max(len(seqs), 64):  # forget finished sequences now and then
            live = {s.seq_id for s in seqs}
            self._rows = {k: v for k, v in self._rows.items() if k in live}
        entries = [self._row(s) for s in seqs]
        n = len(seqs)
        tables = np.stack([e.row for e in entries]) if n else np.zeros((0, self.width), np.int32)
        window_tables = None
        if window_lists is not None:  # each row's blocks from its window's first on
            window_tables = np.zeros((n, self.width), np.int32)
            for i, first in enumerate(np.maximum(lens - self.window, 0) // self.block_size):
                window_tables[i, first:len(window_lists[i])] = window_lists[i][first:]
        self._batches[key] = batch = _Batch(list(seqs), table_lists, lens, tables, entries, window_lists,
                                            window_tables)
        return batch

    def build(self, seqs: list, rows: int, *, target: StepInputs | None = None, chunk: int = 0,
              slot: int = 0) -> StepInputs:
        """Inputs for ``seqs`` padded to ``rows``; written into ``target`` (static graph buffers) if given.

        ``chunk`` (of the step) and ``slot`` (the step's pipeline slot) pick the staging set (see the module
        docstring); where the device is the host, the staging set is the result."""
        n = len(seqs)
        host = self.staging_for(rows, (chunk, slot))
        lens = np.fromiter((len(s.token_ids) for s in seqs), np.int64, n)
        batch = self._batch(seqs, lens, (rows, chunk))
        pos = lens - 1
        ids, positions, slots = host.input_ids.numpy(), host.positions.numpy(), host.slot_mapping.numpy()
        tables, context = host.block_tables.numpy(), host.context_lens.numpy()
        ids[:n] = [s.token_ids[-1] for s in seqs]
        token_slots, out_slots = host.token_slots.numpy(), host.out_slots.numpy()
        out_slots[:n] = [self.scratch_slot if s.token_slot is None else s.token_slot for s in seqs]
        host.state_slots.numpy()[:n] = out_slots[:n]
        host.capture_slots.numpy()[:n], host.capture_lens.numpy()[:n] = self.scratch_slot, 0  # none in decode
        host.state_chain.numpy()[:n] = 1
        host.lora_slots.numpy()[:n] = [s.lora_slot for s in seqs]
        pending = ids[:n] < 0
        token_slots[:n] = np.where(pending, out_slots[:n], -1)
        ids[:n][pending] = 0
        positions[:n] = pos + batch.rope_delta
        context[:n] = lens
        host.sample_positions.numpy()[:n] = lens
        if n:
            tables[:n] = batch.tables
            host.temperature.numpy()[:n] = batch.temperature
            host.top_k.numpy()[:n] = batch.top_k
            host.top_p.numpy()[:n] = batch.top_p
            host.min_p.numpy()[:n] = batch.min_p
            host.seeds.numpy()[:n] = batch.seeds
            slots[:n] = tables[np.arange(n), pos // self.block_size].astype(np.int64) * self.block_size \
                + pos % self.block_size
        if self.window and n:
            window = host.window_tables.numpy()
            window[:n] = batch.window_tables
            host.window_slot_mapping.numpy()[:n] = window[np.arange(n), pos // self.block_size].astype(np.int64) \
                * self.block_size + pos % self.block_size
        host.pad_rows(n, n, self.scratch_slot)
        return self.deliver(host, target)

    def deliver(self, host: StepInputs, target: StepInputs | None) -> StepInputs:
        """A filled staging set on the device: itself where the device is the host, else copied into ``target``
        (a graph's static inputs) or to new device tensors."""
        if host.input_ids.device == self.device:
            return host
        if target is None:
            return host.to(self.device)
        host.copy_into(target)
        return target
