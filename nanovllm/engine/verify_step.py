"""The verify step of speculative decoding (``nanovllm/speculative.py``): a decode step of one row per token.

A sequence of length L with a proposal of m tokens takes m + 1 rows: its newest token (whose KV is not computed
yet) and each proposed token, row j at position L - 1 + j with a context of L + j tokens.  The step stores every
row's K and V before attention reads any (``store_kv``, then ``paged_attention``), so row j sees the rows before it
as a prefill chunk would, and the step runs in the decode graphs of the executor's buckets (split in parts past
the largest).  Every row goes through the LM head and the sampler: row j draws with the noise of position L + j,
as the plain decode step that would produce that token draws it.  The drawn tokens land in the step slot's host
buffer in row order; the token buffer's rows are not written (the scratch row takes them), since the engine
resolves a verify step before it schedules the next one, whose inputs then come from the host.
"""
import numpy as np
import torch

from nanovllm.compile.base import Part
from nanovllm.engine.decode_inputs import DecodeInputBuilder
from nanovllm.engine.pipeline import StepSlot
from nanovllm.engine.scheduler import ScheduledBatch
from nanovllm.step import StepInputs

_PER_ROW = ("input_ids", "positions", "slot_mapping", "context_lens", "temperature", "top_k", "top_p", "seeds",
            "sample_positions")


def rows_per_sequence(config) -> int:
    """Token rows a sequence may take in one step: 1, or 1 + ``num_speculative_tokens`` when speculating."""
    return 1 + (config.speculative.num_speculative_tokens if config.speculative is not None else 0)


def verify_rows(batch: ScheduledBatch, block_size: int, width: int) -> dict[str, np.ndarray]:
    """Every row of ``batch``'s verify step: the per-row fields of ``StepInputs`` and ``block_tables`` [R, width]."""
    cols = {name: [] for name in _PER_ROW}
    tables = []
    for seq, proposal in zip(batch.seqs, batch.proposals):
        start, n = len(seq) - 1, 1 + len(proposal)
        assert seq.num_computed_tokens == start, "a verify step starts at the sequence's newest token"
        pos = np.arange(start, start + n)
        table = np.zeros(width, np.int32)
        table[:len(seq.block_table)] = seq.block_table
        p = seq.params
        cols["input_ids"].append(np.asarray([seq.token_ids[-1], *proposal], np.int64))
        cols["positions"].append(seq.rope_positions(start, n))
        cols["slot_mapping"].append(table[pos // block_size].astype(np.int64) * block_size + pos % block_size)
        cols["context_lens"].append(pos + 1)
        cols["sample_positions"].append(pos + 1)
        for name, value in (("temperature", p.temperature), ("top_k", p.top_k), ("top_p", p.top_p),
                            ("seeds", seq.seed)):
            cols[name].append(np.full(n, value))
        tables.append(np.broadcast_to(table, (n, width)))
    return {**{name: np.concatenate(v) for name, v in cols.items()}, "block_tables": np.concatenate(tables)}


def build_part(builder: DecodeInputBuilder, rows: dict, part: Part, slot: int) -> StepInputs:
    """The inputs of one part of the step: rows [part.start, part.start + part.rows), padded to the part's
    rows, in the builder's staging set for (verify, part, ``slot``), into ``part.target`` when given."""
    padded = part.shape[1]
    host = builder.staging_for(padded, ("verify", part.index, slot))
    live = slice(part.start, part.start + part.rows)
    for name, values in rows.items():
        getattr(host, name).numpy()[:part.rows] = values[live]
    host.token_slots.numpy()[:part.rows] = -1  # every input token is on the host
    host.out_slots.numpy()[:part.rows] = builder.scratch_slot
    host.pad_rows(part.rows, part.rows, builder.scratch_slot)
    return builder.deliver(host, part.target)


@torch.inference_mode()
def launch(runner, batch: ScheduledBatch, slot: StepSlot):
    """Queue ``batch``'s verify step on ``runner`` (a ``ModelRunner``) through its executor; the drawn tokens, one
    per row, are copied to ``slot.host_tokens`` in the background.  Returns the platform event after its work."""
    builder = runner.decode_builder
    rows = verify_rows(batch, builder.block_size, builder.width)
    total = len(rows["input_ids"])

    def emit(outputs, inputs, part: Part) -> None:  # outputs: ``step_outputs``'s, tokens first
        slot.host_tokens[part.start:part.start + part.rows].copy_(outputs[0][:part.rows], non_blocking=True)

    runner.executor.run(prefill=False, rows=total, tokens=total, emit=emit,
                        build=lambda part: build_part(builder, rows, part, slot.index))
    return runner.platform.record_event()
