"""What the engine does differently for a hybrid model (linear-attention layers with per-sequence state pools,
``models/hybrid.py``): prefix-cache snapshots of the states, and the spare states of speculative decoding.

A prefix hit needs the state at the hit's last block boundary.  ``StateSnapshots`` keeps such states in the pools'
rows past the running sequences', keyed by the hash of the block ending the prefix, least recently used evicted
first.  A prompt takes the deepest cached prefix whose KV blocks are cached *and* whose state is snapshotted
(``BlockManager.try_allocate``), and snapshots where its cached KV ends and at its last full block, each moved down to
a multiple of ``CAPTURE_ALIGN`` tokens past the hit (``capture_depths``; the kernels write it during the step); at any
other boundary (``shared_prefix.py``'s, a later chunk's) the chunk is cut (``cut_chunk``) and the state copied after
the step.  A snapshot a prompt of the step being built restores survives that step's captures.  How many:
``state_snapshots``, or by default (``grow_snapshots``) half the memory the running sequences cannot use.
Speculative decoding: a verify step chains a sequence's rows (``kernels/linear_attention/ops.py``), row j's state kept
in its token slot (j = 0) or its j-th spare past the scratch row (``verify_slot``); once the step is resolved, the
last accepted row's is copied into the token slot before the next step (``verified_moves``).
"""
import functools
from collections import OrderedDict

import torch

from nanovllm.kernels.linear_attention.ops import CAPTURE_ALIGN


class StateSnapshots:
    def __init__(self, first: int, count: int):
        self.count = count  # 0: prefix hits off
        self.free = list(range(first + count - 1, first - 1, -1))
        self.by_hash: OrderedDict[int, int] = OrderedDict()  # block hash -> snapshot slot, least recent first
        self.pending: dict[int, int] = {}  # taken while scheduling the step being built, readable after it
        self.restored: set[int] = set()  # hashes the step being built restores: kept from its captures
        self.captured = 0  # snapshots taken (a statistic)

    def deepest(self, hashes: list[int]) -> int:
        """The most leading blocks of ``hashes`` (a prefix's chain) whose last one has a snapshot (0: none)."""
        for depth in range(len(hashes), 0, -1):
            if hashes[depth - 1] in self.by_hash:
                self.by_hash.move_to_end(hashes[depth - 1])
                self.restored.add(hashes[depth - 1])
                return depth
        return 0

    def slot(self, block_hash: int) -> int:
        return self.by_hash[block_hash]

    def take(self, block_hash: int) -> int | None:
        """A slot to snapshot the state at ``block_hash`` into, after this step: the one this step already writes
        it into, a free one, or the least recently used that this step does not restore (restores are queued before
        captures, but the next prompts sharing it would miss); None where a snapshot of that prefix is kept already
        (the same tokens give that state: taking it back to write it again hid it from the step's new prompts, so
        a burst sharing a system prompt missed it step after step) or while every slot is this step's own."""
        if block_hash in self.pending:
            return self.pending[block_hash]
        if block_hash in self.by_hash:
            self.by_hash.move_to_end(block_hash)
            return None
        if self.free:
            slot = self.free.pop()
        elif self.by_hash and next(iter(self.by_hash)) not in self.restored:  # (restored ones are the most recent)
            _, slot = self.by_hash.popitem(last=False)
        else:
            return None
        self.pending[block_hash] = slot
        self.captured += 1
        return slot

    def commit(self) -> None:
        """The step is built: its snapshots may be restored by later steps (queued after its captures)."""
        self.by_hash.update(self.pending)
        self.pending.clear()
        self.restored.clear()


def capture_depths(start: int, depths, block_size: int) -> list[int]:
    """The block counts, past ``start`` (the hit's), at which a prompt's state is snapshotted, from the ``depths``
    the policy names (its cached KV's end, its last full block): each moved down to a multiple of ``CAPTURE_ALIGN``
    tokens past ``start``, where the kernels write it inside the first chunk.  A boundary elsewhere would cut the
    chunk there and cost the prompt a step before its first token; a later hit then recomputes < CAPTURE_ALIGN
    tokens more.  Sorted, each once; none at ``start`` or before."""
    step = CAPTURE_ALIGN // block_size if CAPTURE_ALIGN % block_size == 0 else 1
    return sorted({start + (d - start) // step * step for d in depths if d - start >= step})


def cut_chunk(seq, n: int, snapshots: StateSnapshots | None, batch) -> int:
    """The tokens of ``seq``'s next prefill chunk, at most ``n``; adds the copies the chunk needs to ``batch``:
    (snapshot, slot) to restore before the step, and for each capture point in the chunk, either the kernels'
    snapshot inside it (``inner_captures``: one a row, a multiple of ``CAPTURE_ALIGN`` tokens in) or (slot,
    snapshot) to copy after the step, the chunk cut there.  ``n`` itself for a model without snapshots."""
    if snapshots is None:
        return n
    restores, captures = batch.restores, batch.captures
    start = seq.num_computed_tokens
    if seq.state_restore is not None:
        restores.append((seq.state_restore, seq.token_slot))
        seq.state_restore = None
    for tokens, block_hash in seq.capture_points:
        if start < tokens <= start + n:
            inside = tokens < start + n and (tokens - start) % CAPTURE_ALIGN == 0 \
                and seq.seq_id not in batch.inner_captures
            slot = snapshots.take(block_hash)
            if slot is None:  # kept already, or no room this step: no snapshot here
                continue
            if inside:
                batch.inner_captures[seq.seq_id] = (slot, tokens - start)
                continue
            captures.append((seq.token_slot, slot))
            return tokens - start
    return n


def spares(config) -> int:
    """State slots a token slot has beside its own for verify steps: ``num_speculative_tokens`` (0 without)."""
    return config.speculative.num_speculative_tokens if config.speculative is not None else 0


def verify_slot(token_slot: int, row: int, max_num_seqs: int, per_slot: int) -> int:
    """The state slot of row ``row`` of a verify step's rows of the sequence in ``token_slot``: the token slot, then
    its spares (``per_slot`` of them) past the scratch row."""
    return token_slot if row == 0 else max_num_seqs + 1 + token_slot * per_slot + row - 1


def verified_moves(batch, max_num_seqs: int, per_slot: int) -> list[tuple[int, int]]:
    """(spare, token slot) of each sequence of a resolved verify ``batch`` still running that accepted a proposed
    token: the state after its last accepted row, copied into its token slot before the next step."""
    return [(verify_slot(seq.token_slot, kept, max_num_seqs, per_slot), seq.token_slot)
            for seq, kept in zip(batch.seqs, batch.accepted) if kept and seq.token_slot is not None]


def size_state_pools(spec, config) -> bool:
    """Whether the model is hybrid (``spec``: its ``KVCacheSpec``); if so, give its state pools a slot per token
    slot (the scratch row too), the verify steps' spares, then ``state_snapshots`` snapshot slots."""
    if all(s is None for s in spec.states):
        return False
    fixed = config.state_snapshots if config.state_snapshots is not None else config.max_num_seqs // 4 + 2
    spec.num_state_slots = snapshots_start(config) + fixed
    if config.state_snapshots is None:
        spec.grow_states = functools.partial(grow_snapshots, spec, spec.num_state_slots, config)
    return True


def grow_snapshots(spec, slots: int, config, budget: int, agree) -> None:
    """With ``state_snapshots`` left to its default, where the platform measures memory: ``slots`` (running
    sequences, scratch, ``max_num_seqs // 4 + 2`` snapshots) plus half of the cache's ``budget`` bytes that neither
    they nor the KV blocks of ``max_num_seqs`` sequences at ``max_model_len`` take, as more snapshots.  Blocks past
    those only serve prefix hits, and a hybrid model's hit needs a snapshot where it ends as well as its blocks: so
    a conversation's next turn finds its own (``agree``: one count on every rank)."""
    running = config.max_num_seqs * -(-config.max_model_len // spec.block_size) * spec.bytes_per_block
    spare = budget - slots * spec.bytes_per_state_slot - running
    spec.num_state_slots = slots + agree(max(0, spare // 2 // spec.bytes_per_state_slot))


def snapshots_start(config) -> int:
    """The first snapshot slot: past the running sequences' slots, their spares and the scratch row."""
    return config.max_num_seqs * (1 + spares(config)) + 1


def snapshots(runner) -> StateSnapshots | None:
    """A hybrid runner's prefix-cache snapshots (the state pools' rows past the running sequences'; maybe none, which
    turns its prefix hits off); None for a model without state pools."""
    first = snapshots_start(runner.config)
    return StateSnapshots(first, runner.kv_spec.num_state_slots - first) if runner.hybrid else None


def copy_states(runner, pairs: list[tuple[int, int]]) -> None:
    """Copy each (from, to) row of every state pool of ``runner``, queued on its device in step order."""
    if not pairs:
        return
    src, dst = (torch.tensor(side, dtype=torch.int64).to(runner.device, non_blocking=True) for side in zip(*pairs))
    for kind, pools in zip(runner.kv_spec.states, runner.kv_caches):
        if kind is not None:
            for pool in pools:
                pool.index_copy_(0, dst, pool.index_select(0, src))
