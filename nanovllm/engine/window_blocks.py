"""The window pool: KV blocks of the sliding-window layers, of which a sequence holds only what its window needs.

A layer of window W lets a query at position p see keys p - W < j <= p.  The sliding layers keep their KV in one
pool (``KVCacheSpec``; W the largest window), indexed by ``Sequence.window_table`` as ``block_table`` is the full one.
* Before a step whose new tokens of a sequence start at ``start`` (``reserve``), the sequence holds window blocks
  from ``first_needed(start)``, the block of key ``start - W + 1``, to the block of its last new token; blocks wholly
  before go back to the pool, their entries ``NULL``: block 0, never handed out nor written.  Attention kernels
  never read a block lying wholly before the earliest key a query of the step sees, so a ``NULL`` is never read.
* Prefix caching follows the full pool's (``block_manager.py``): a computed block is published under its full
  block's chain hash (``register``), and keeps it once released until reused, least recently released first.  A hit
  of depth d also needs the blocks of keys [d*bs - W + 1, d*bs), the window of its first new token
  (``cached_depth``): a prompt takes the deepest d for which both pools hold theirs.
* Between steps (``release``) a sequence holds only its window's blocks: sized to that for all (``window_bound``,
  ``pool_size``) the pool never runs out; smaller (``KVCacheSpec.pressured``) it may, so every step is cut to
  ``reach`` (the scheduler admits, chunks and preempts by it) and ``reserve`` running out is a bug.
"""
from collections import OrderedDict

NULL = 0  # the window-table entry of a block a sequence does not hold


def window_bound(window: int, block_size: int, max_num_seqs: int, step_tokens: int, tail: int = 0) -> int:
    """The most window blocks running sequences hold at once.  Between its steps a sequence holds the blocks of keys
    [c - W + 1, c + r), c its computed tokens (``release``, once a step of it is launched) and r <= ``tail`` those of
    rejected proposals (speculative decoding: k): at most ceil((W - 1 + tail) / bs) + 1 blocks.  A step adds to
    each of its sequences the blocks of its n new tokens, at most ceil(n / bs) < n / bs + 1 more, n summing to at
    most ``step_tokens``.  So ``max_num_seqs * (ceil((W - 1 + tail) / bs) + 2) + ceil(step_tokens / bs)``."""
    return max_num_seqs * (-(-(window - 1 + tail) // block_size) + 2) + -(-step_tokens // block_size)


def pool_size(bound: int, kept: int, num_full_blocks: int) -> int:
    """Blocks of the window pool, ``NULL`` included: the most the running sequences hold (``bound``, never more than
    the full pool's ``num_full_blocks``, where they hold theirs) and ``kept`` more for prefix hits."""
    return min(bound, num_full_blocks) + kept + 1


class WindowBlocks:
    def __init__(self, num_blocks: int, block_size: int, window: int):
        assert window > 0 and num_blocks >= 2
        self.num_blocks, self.block_size, self.window = num_blocks, block_size, window
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(1, num_blocks))  # NULL never
        self.first: dict[int, int] = {}  # seq_id -> its first entry that may hold a block
        self.peak_held = 0  # the most blocks held at once (a statistic)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_held_blocks(self) -> int:
        return self.num_blocks - 1 - len(self.free_blocks)

    def first_needed(self, start: int) -> int:
        """The first logical block a step from position ``start`` reads: that of key ``start - W + 1``."""
        return max(0, start - self.window + 1) // self.block_size

    def _cached(self, block_hash: int, key: tuple) -> int | None:
        block = self.hash_to_block.get(block_hash)
        return block if block is not None and self.block_tokens[block] == key else None

    def cached_depth(self, hashes: list[int], keys: list[tuple]) -> int:
        """The deepest d <= len(hashes) (the full pool's cached prefix: chain hashes and keys of its blocks) whose
        window, blocks ``first_needed(d * bs)`` to d - 1, is cached here too; 0 if none is."""
        for depth in range(len(hashes), 0, -1):
            if all(self._cached(hashes[i], keys[i]) is not None
                   for i in range(self.first_needed(depth * self.block_size), depth)):
                return depth
        return 0

    def take_hits(self, seq, hashes: list[int], keys: list[tuple], depth: int) -> None:
        """Give a sequence admitted with a hit of ``depth`` blocks (``cached_depth`` allowed it) their window."""
        first = self.first_needed(depth * self.block_size)
        table = [NULL] * first
        for i in range(first, depth):
            block = self._cached(hashes[i], keys[i])
            if self.ref_counts[block] == 0:
                del self.free_blocks[block]
            self.ref_counts[block] += 1
            table.append(block)
        seq.window_table = table
        self.first[seq.seq_id] = first
        self._note_peak()

    def release(self, seq, start: int) -> int:
        """Give back the sequence's blocks wholly before the window of position ``start`` (its next step's first new
        token: a step already queued reads them before a later one can write them); returns the first kept."""
        table = seq.window_table
        first = self.first_needed(start)
        held_from = self.first.get(seq.seq_id, 0)
        for i in range(held_from, min(first, len(table))):
            self._release(table[i])
            table[i] = NULL
        if first > held_from:
            self.first[seq.seq_id] = first
        return first

    def reach(self, seq, start: int) -> int:
        """The most tokens a step from ``start`` may reach: ``reserve(seq, start, end)`` does not run out for any
        ``end`` up to it (blocks held, blocks its release frees, and the free ones)."""
        table, first = seq.window_table, self.first_needed(start)
        freed = sum(1 for b in table[self.first.get(seq.seq_id, 0):first] if b != NULL and self.ref_counts[b] == 1)
        return (max(len(table), first) + len(self.free_blocks) + freed) * self.block_size

    def hit_room(self, hashes: list[int], keys: list[tuple], depth: int, end: int) -> bool:
        """Whether a waiting sequence admitted with a hit of ``depth`` blocks (``take_hits``) can then ``reserve``
        its first chunk, up to token ``end``: the hit's blocks that lie free and the chunk's new ones are free."""
        revived = sum(1 for i in range(self.first_needed(depth * self.block_size), depth)
                      if self.ref_counts[self._cached(hashes[i], keys[i])] == 0)
        return revived + max(0, -(-end // self.block_size) - depth) <= len(self.free_blocks)

    def reserve(self, seq, start: int, end: int) -> None:
        """Before a step that computes the sequence's tokens [start, end): ``release`` what lies before the window
        of ``start`` and take blocks for the tokens up to ``end``."""
        table, first = seq.window_table, self.release(seq, start)
        needed = -(-end // self.block_size)
        if needed > len(table):
            if needed - max(len(table), first) > len(self.free_blocks):
                raise RuntimeError(f"the window pool ran out ({self.num_blocks - 1} blocks, {self.num_held_blocks} "
                                   f"held): every step is cut to its room (``reach``), so this is a bug")
            table.extend(self._take() if i >= first else NULL for i in range(len(table), needed))
            self._note_peak()

    def register(self, seq, index: int, block_hash: int, key: tuple) -> None:
        """Publish the sequence's window block ``index``, just computed, under the full pool's chain hash (nothing
        if it was released already)."""
        table = seq.window_table
        block = table[index] if index < len(table) else NULL
        if block == NULL:
            return
        self.block_hash[block] = block_hash
        self.block_tokens[block] = key
        self.hash_to_block[block_hash] = block

    def held_by(self, seq) -> int:
        """Window blocks the sequence holds."""
        return sum(1 for b in seq.window_table if b != NULL)

    def free(self, seq) -> None:
        """Drop every block of the sequence (finished or preempted); they stay hashed until reused."""
        for block in reversed(seq.window_table):
            if block != NULL:
                self._release(block)
        seq.window_table = []
        self.first.pop(seq.seq_id, None)

    def reset(self) -> None:
        """Forget every cached block (``BlockManager.reset_prefix_cache``, while no sequence holds any)."""
        self.hash_to_block.clear()
        self.block_hash = [None] * self.num_blocks
        self.block_tokens = [None] * self.num_blocks

    def _take(self) -> int:
        block, _ = self.free_blocks.popitem(last=False)
        old = self.block_hash[block]
        if old is not None and self.hash_to_block.get(old) == block:
            del self.hash_to_block[old]
        self.block_hash[block] = self.block_tokens[block] = None
        self.ref_counts[block] = 1
        return block

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        assert self.ref_counts[block] >= 0
        if self.ref_counts[block] == 0:
            self.free_blocks[block] = None

    def _note_peak(self) -> None:
        self.peak_held = max(self.peak_held, self.num_held_blocks)


def window_pool(runner) -> "WindowBlocks | None":
    """The bookkeeping of a ``ModelRunner``'s window pool (``KVCacheSpec.plan_window_pool``), or None."""
    spec = runner.kv_spec
    if not spec.window:
        return None
    return WindowBlocks(spec.num_window_blocks(runner.num_blocks), spec.block_size, spec.window)
