"""The verify step of speculative decoding (``nanovllm/speculative.py``): a decode step of one row per token.

A sequence of length L with a proposal of m tokens takes m + 1 rows: its newest token (whose KV is not computed
yet) and each proposed token, row j at position L - 1 + j with a context of L + j tokens.  The step stores every
row's K and V before attention reads any (``store_kv``, then ``paged_attention``), so row j sees the rows before it
as a prefill chunk would, and the step runs in the decode graphs of the executor's buckets (split in parts past
the largest).  Every row goes through the LM head and the sampler: row j draws with the noise of position L + j,
as the plain decode step that would produce that token draws it.  The drawn tokens land in the step slot's host
buffer in row order; the token buffer's rows are not written (the scratch row takes them), since the engine
resolves a verify step before it schedules the next one, whose inputs then come from the host.  A hybrid model's
linear-attention layers run a sequence's rows as one chain from its state (``hybrid_state.py``).
"""
import numpy as np
import torch

from nanovllm.compile.base import Part
from nanovllm.engine import hybrid_state
from nanovllm.engine.decode_inputs import DecodeInputBuilder
from nanovllm.engine.pipeline import StepSlot
from nanovllm.engine.batch import ScheduledBatch
from nanovllm.step import StepInputs

def rows_per_sequence(config) -> int:
    """Token rows a sequence may take in one step: 1, or 1 + ``num_speculative_tokens`` when speculating."""
    return 1 + (config.speculative.num_speculative_tokens if config.speculative is not None else 0)


def sequence_rows(seq, start: int, ids, block_size: int, width: int, window: int = 0) -> dict[str, np.ndarray]:
    """Rows of ``seq``'s tokens ``ids`` at positions ``start``.. (one row each, context up to and with it, drawing
    the token after it, through ``seq``'s LoRA slot): the per-row fields of ``StepInputs`` and ``block_tables``
    [rows, width]; with a window pool (``window``: its W), ``WindowStepInputs``' window fields too (its blocks from
    the window of ``start`` on)."""
    n = len(ids)
    pos = np.arange(start, start + n)
    table = np.zeros(width, np.int32)
    table[:len(seq.block_table)] = seq.block_table
    p = seq.params
    rows = {"input_ids": np.asarray(ids, np.int64), "positions": seq.rope_positions(start, n),
            "slot_mapping": table[pos // block_size].astype(np.int64) * block_size + pos % block_size,
            "context_lens": pos + 1, "sample_positions": pos + 1, "temperature": np.full(n, p.temperature),
            "top_k": np.full(n, p.top_k), "top_p": np.full(n, p.top_p),
            "min_p": np.full(n, p.min_p), "seeds": np.full(n, seq.seed), "lora_slots": np.full(n, seq.lora_slot),
            "block_tables": np.broadcast_to(table, (n, width))}
    if window:
        held = np.zeros(width, np.int32)
        first = max(0, start - window + 1) // block_size
        held[first:len(seq.window_table)] = seq.window_table[first:]
        rows["window_tables"] = np.broadcast_to(held, (n, width))
        rows["window_slot_mapping"] = held[pos // block_size].astype(np.int64) * block_size + pos % block_size
    return rows


def concatenate(rows: list[dict]) -> dict[str, np.ndarray]:
    """Several ``sequence_rows`` as one step's rows, in order."""
    return {name: np.concatenate([r[name] for r in rows]) for name in rows[0]}


def verify_rows(batch: ScheduledBatch, block_size: int, width: int, window: int = 0,
                states: tuple[int, int] = (0, 0)) -> dict[str, np.ndarray]:
    """Every row of ``batch``'s verify step: the per-row fields of ``StepInputs`` and ``block_tables`` [R, width]
    (``sequence_rows``), with a hybrid model's state slots, a sequence's rows one chain (``hybrid_state.verify_slot``
    of ``states``: (max_num_seqs, spares per token slot))."""
    rows = []
    for seq, proposal in zip(batch.seqs, batch.proposals):
        assert seq.num_computed_tokens == len(seq) - 1, "a verify step starts at the sequence's newest token"
        r = sequence_rows(seq, len(seq) - 1, [seq.token_ids[-1], *proposal], block_size, width, window)
        n = 1 + len(proposal)
        r["state_slots"] = np.array([hybrid_state.verify_slot(seq.token_slot, j, *states) for j in range(n)])
        r["state_chain"] = np.array([n] + [0] * (n - 1))
        rows.append(r)
    return concatenate(rows)


def part_chains(chain: np.ndarray, start: int, stop: int) -> np.ndarray:
    """``state_chain`` of rows [start, stop) run as one part: each chain cut at the part's end, and one cut at its
    start beginning again there (from the state its row before left: ``launch`` copies it)."""
    idx = np.arange(start, stop)
    heads = np.flatnonzero(chain > 0)
    head = heads[np.searchsorted(heads, idx, side="right") - 1]
    end = np.minimum(head + chain[head], stop)
    return np.where((idx == head) | (idx == start), end - idx, 0)


def build_part(builder: DecodeInputBuilder, rows: dict, part: Part, key: tuple) -> StepInputs:
    """The inputs of one part of a step of ``rows`` (``sequence_rows``; with ``token_slots`` and ``out_slots``
    where given, else every input token from the host and every drawn one to the scratch row): rows
    [part.start, part.start + part.rows), padded to the part's rows, in the builder's staging set for
    (``key``, part), into ``part.target`` when given."""
    padded = part.shape[1]
    host = builder.staging_for(padded, (*key, part.index))
    live = slice(part.start, part.start + part.rows)
    host.token_slots.numpy()[:part.rows] = -1
    host.out_slots.numpy()[:part.rows] = builder.scratch_slot
    host.state_slots.numpy()[:part.rows] = builder.scratch_slot
    host.state_chain.numpy()[:part.rows] = 1
    for name, values in rows.items():
        getattr(host, name).numpy()[:part.rows] = values[live]
    if "state_chain" in rows:
        host.state_chain.numpy()[:part.rows] = part_chains(rows["state_chain"], live.start, live.stop)
    host.pad_rows(part.rows, part.rows, builder.scratch_slot)
    return builder.deliver(host, part.target)


@torch.inference_mode()
def launch(runner, batch: ScheduledBatch, slot: StepSlot):
    """Queue ``batch``'s verify step on ``runner`` (a ``ModelRunner``) through its executor; the drawn tokens, one
    per row, are copied to ``slot.host_tokens`` in the background.  Returns the platform event after its work."""
    builder = runner.decode_builder
    rows = verify_rows(batch, builder.block_size, builder.width, builder.window,
                       (runner.config.max_num_seqs, hybrid_state.spares(runner.config)))
    total = len(rows["input_ids"])

    def emit(outputs, inputs, part: Part) -> None:  # outputs: ``step_outputs``'s, tokens first
        slot.host_tokens[part.start:part.start + part.rows].copy_(outputs[0][:part.rows], non_blocking=True)

    def build(part: Part) -> StepInputs:
        if runner.hybrid and part.start and rows["state_chain"][part.start] == 0:  # a chain the part before cut
            hybrid_state.copy_states(runner, [tuple(rows["state_slots"][part.start - 1:part.start + 1])])
        return build_part(builder, rows, part, ("verify", slot.index))

    hybrid_state.copy_states(runner, batch.restores)  # a hybrid model's states kept by the verify step before
    runner.executor.run(prefill=False, rows=total, tokens=total, emit=emit, build=build)
    return runner.platform.record_event()
