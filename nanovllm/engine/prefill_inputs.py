"""Builds prefill ``StepInputs`` from a scheduled batch, and the all-padding prefills start-up runs.

A prefill step is packed by ``cu_seqlens_q``: each sequence's new tokens (a chunk of its prompt, from
``num_computed_tokens``), then one trailing padding sequence (slot -1, context 0), so the compiled step never
meets a size of 1, which the compiler would specialise on.  Padded to a prefill graph's (tokens, rows), the tokens
past the real ones all belong to that padding sequence and the rows after it hold no tokens.  Block tables are
always ``table_width`` (blocks of a ``max_model_len`` sequence) wide, a static shape.  Real steps are staged in
one (pinned, where the platform pins) host buffer and reach the device, or a graph's static inputs, in one copy:
separate pageable copies would each wait for the step before to finish.  ``prompt_logprob_rows`` says which token
rows of that layout predict a prompt token whose logprob a request asked for.  A decode row riding in the step
(one token, ``scheduler.py``) may still wait for that token: it reads it from its token slot (``token_slots``).
With a window pool (``window``: its W) the inputs are ``WindowStepInputs``, the window fields built like the others
from each sequence's ``window_table`` (an all-padding prefill's: the full pool's, all padding too).
"""
import numpy as np
import torch

from nanovllm.engine.sequence import PENDING_TOKEN
from nanovllm.step import PADDING, StepInputs, WindowStepInputs


def sampling_arrays(seqs, rows: int) -> dict:
    """Per-row sampling fields of ``seqs``, padded to ``rows``."""
    out = {"temperature": np.full(rows, PADDING["temperature"], np.float32),
           "top_k": np.full(rows, PADDING["top_k"], np.int64), "top_p": np.full(rows, PADDING["top_p"], np.float32),
           "min_p": np.full(rows, PADDING["min_p"], np.float32),
           "seeds": np.full(rows, PADDING["seeds"], np.int64),
           "sample_positions": np.full(rows, PADDING["sample_positions"], np.int64)}
    for i, seq in enumerate(seqs):
        p = seq.params
        out["temperature"][i], out["top_k"][i], out["top_p"][i] = p.temperature, p.top_k, p.top_p
        out["min_p"][i] = p.min_p
        out["seeds"][i], out["sample_positions"][i] = seq.seed, len(seq)
    return out


def prompt_logprob_rows(batch) -> tuple[list, np.ndarray, np.ndarray]:
    """The rows of a prefill batch (laid out as ``PrefillInputBuilder.build`` lays it out) whose logprobs of the next
    prompt token were asked for (``Sequence.prompt_logprob_span``): (per sequence with some, (sequence, first prompt
    position, count)), their token rows [n] and the prompt tokens they predict [n]."""
    groups, rows, targets, offset = [], [], [], 0
    for seq, n in zip(batch.seqs, batch.num_new_tokens):
        first, count = seq.prompt_logprob_span(n)
        if count:
            groups.append((seq, first, count))
            rows.append(np.arange(offset, offset + count))
            targets.append(np.asarray(seq.token_ids[first:first + count], np.int64))
        offset += n
    if not groups:
        return [], np.zeros(0, np.int64), np.zeros(0, np.int64)
    return groups, np.concatenate(rows), np.concatenate(targets)


class PrefillInputBuilder:
    def __init__(self, *, device: torch.device, pin_memory: bool, block_size: int, table_width: int,
                 scratch_slot: int, max_model_len: int, window: int = 0):
        self.device, self.pin_memory = device, pin_memory
        self.window = window  # the window pool's W, 0 without one
        self.block_size, self.table_width = block_size, table_width
        self.scratch_slot, self.max_model_len = scratch_slot, max_model_len

    @torch.inference_mode()  # inputs are always inference tensors, so compiled guards see one kind
    def _finish(self, packed: bool, target: StepInputs | None, token_slots=None, windowed: bool = True,
                **arrays) -> StepInputs:
        if token_slots is None:
            token_slots = np.full(len(arrays["input_ids"]), PADDING["token_slots"])
        arrays.setdefault("lora_slots", np.zeros(len(arrays["input_ids"]), np.int64))  # ``dummy``, ``probe``: none
        arrays.setdefault("state_chain", np.ones(len(arrays["context_lens"]), np.int64))  # prefill: every row alone
        windowed = windowed and bool(self.window)
        if windowed and "window_tables" not in arrays:  # ``dummy``, ``probe``: the full pool's blocks in both
            arrays.update(window_tables=arrays["block_tables"].copy(),  # copies: inputs that alias would be traced
                          window_slot_mapping=arrays["slot_mapping"].copy())  # as such (guards on aliasing)
        host = (WindowStepInputs if windowed else StepInputs).from_arrays(token_slots=token_slots, **arrays)
        if packed:
            host = host.packed_copy(pin_memory=self.pin_memory)
        if target is not None:
            host.copy_into(target)
            return target
        return host if host.input_ids.device == self.device else host.to(self.device)

    def build(self, batch, shape: tuple[int, int] | None = None, target: StepInputs | None = None) -> StepInputs:
        """Inputs of a prefill step, padded to ``shape`` = (tokens, rows) of a prefill graph and written into
        ``target`` (its static inputs) when given; without a shape, one trailing padding sequence of one token."""
        bs = self.block_size
        seqs = batch.seqs
        tokens, positions, slots, cu, pending, window_slots = [], [], [], [0], [], []
        for seq, n in zip(seqs, batch.num_new_tokens):
            start = seq.num_computed_tokens
            pos = np.arange(start, start + n)
            chunk = np.asarray(seq.token_ids[start:start + n])
            if n and chunk[-1] == PENDING_TOKEN:  # a decode row: its token is still on the device, in its token slot
                assert n == 1, "only a decode row's one token may be unresolved in a prefill step"
                pending.append((cu[-1], seq.token_slot))
                chunk = np.zeros(1, np.int64)
            else:
                assert (chunk != PENDING_TOKEN).all(), "a prefill chunk must not contain an unresolved token"
            table = np.asarray(seq.block_table, dtype=np.int64)
            tokens.append(chunk)
            positions.append(seq.rope_positions(start, n))
            slots.append(table[pos // bs] * bs + pos % bs)
            if self.window:
                window_slots.append(np.asarray(seq.window_table, np.int64)[pos // bs] * bs + pos % bs)
            cu.append(cu[-1] + n)
        num_tokens, rows = shape or (cu[-1] + 1, len(seqs) + 1)
        assert num_tokens >= cu[-1] and rows > len(seqs), "the padded shape must hold the step and a padding row"
        pad = num_tokens - cu[-1]
        tokens.append(np.full(pad, PADDING["input_ids"], np.int64))
        positions.append(np.full(pad, PADDING["positions"], np.int64))
        slots.append(np.full(pad, PADDING["slot_mapping"], np.int64))
        window = {}
        if self.window:
            window_slots.append(slots[-1])
            window["window_slot_mapping"] = np.concatenate(window_slots)
            window["window_tables"] = np.zeros((rows, self.table_width), np.int32)
            for i, seq in enumerate(seqs):
                window["window_tables"][i, :len(seq.window_table)] = seq.window_table
        cu = np.asarray(cu + [num_tokens] * (rows - len(seqs)))
        out_slots = np.full(rows, self.scratch_slot)
        state_slots, capture_slots = np.full(rows, self.scratch_slot), np.full(rows, self.scratch_slot)
        capture_lens = np.zeros(rows, np.int64)
        tables = np.zeros((rows, self.table_width), np.int32)
        for i, seq in enumerate(seqs):
            tables[i, :len(seq.block_table)] = seq.block_table
            state_slots[i] = seq.token_slot
            if seq.seq_id in batch.inner_captures:
                capture_slots[i], capture_lens[i] = batch.inner_captures[seq.seq_id]
            if batch.samples(i):
                out_slots[i] = seq.token_slot
        context = np.zeros(rows, np.int64)
        context[:len(seqs)] = [s.num_computed_tokens + n for s, n in zip(seqs, batch.num_new_tokens)]
        token_slots = np.full(num_tokens, PADDING["token_slots"])
        lora = np.zeros(num_tokens, np.int64)
        lora[:cu[len(seqs)]] = np.repeat([s.lora_slot for s in seqs], batch.num_new_tokens)
        for row, token_slot in pending:
            token_slots[row] = token_slot
        return self._finish(True, target, token_slots, input_ids=np.concatenate(tokens),
                            positions=np.concatenate(positions),
                            slot_mapping=np.concatenate(slots), block_tables=tables, context_lens=context,
                            cu_seqlens_q=cu, logits_indices=cu[1:] - 1, out_slots=out_slots, state_slots=state_slots,
                            lora_slots=lora, capture_slots=capture_slots, capture_lens=capture_lens, **window,
                            **sampling_arrays(seqs, rows))

    def dummy(self, tokens: int = 7, rows: int = 3, packed: bool = False, windowed: bool = True) -> StepInputs:
        """A prefill of ``tokens`` tokens in ``rows`` sequences (the last of one token) that writes nothing (every
        slot -1; ``windowed`` False: plain ``StepInputs`` whatever the window pool, for a draft model).  Each
        sequence is a whole prompt (context = its tokens, positions from 0), as the attention kernel requires, and
        reads KV block 0 only.  The step is first traced on the default 7 tokens in 3 sequences: token and sequence
        counts differ, so the compiler gives them separate symbols."""
        assert 2 <= rows <= tokens
        cu = np.append(np.linspace(0, tokens - 1, rows).astype(np.int64), tokens)
        lengths = np.diff(cu)
        assert lengths.max() <= self.max_model_len, "dummy sequences longer than max_model_len"
        return self._finish(packed, None, windowed=windowed, input_ids=np.zeros(tokens, np.int64),
                            positions=np.arange(tokens) - np.repeat(cu[:-1], lengths),
                            slot_mapping=np.full(tokens, PADDING["slot_mapping"]),
                            block_tables=np.zeros((rows, self.table_width), np.int32), context_lens=lengths,
                            cu_seqlens_q=cu, logits_indices=cu[1:] - 1, out_slots=np.full(rows, self.scratch_slot),
                            state_slots=np.full(rows, self.scratch_slot), **self._no_captures(rows),
                            **sampling_arrays((), rows))

    def probe(self, num_seqs: int, seq_len: int) -> StepInputs:
        """``num_seqs`` whole prompts of ``seq_len`` tokens that write blocks 0.. in order: the step at its most
        memory-hungry shape, for sizing the KV cache (``kv_cache.plan_num_blocks``)."""
        blocks_each = -(-seq_len // self.block_size)
        tables = np.zeros((num_seqs, self.table_width), np.int32)
        tables[:, :blocks_each] = np.arange(num_seqs * blocks_each).reshape(num_seqs, blocks_each)
        pos = np.arange(seq_len)
        slots = tables[:, pos // self.block_size].astype(np.int64) * self.block_size + pos % self.block_size
        cu = np.arange(0, num_seqs * seq_len + 1, seq_len)
        return self._finish(False, None, input_ids=np.zeros(num_seqs * seq_len, np.int64),
                            positions=np.tile(pos, num_seqs), slot_mapping=slots.reshape(-1), block_tables=tables,
                            context_lens=np.full(num_seqs, seq_len), cu_seqlens_q=cu, logits_indices=cu[1:] - 1,
                            out_slots=np.full(num_seqs, self.scratch_slot),
                            state_slots=np.full(num_seqs, self.scratch_slot), **self._no_captures(num_seqs),
                            **sampling_arrays((), num_seqs))

    def _no_captures(self, rows: int) -> dict:
        return {"capture_slots": np.full(rows, self.scratch_slot), "capture_lens": np.zeros(rows, np.int64)}
