"""Paged KV-cache bookkeeping with prefix caching.

A block is identified by a hash chain: ``hash(block i) = xxh64(hash(block i-1), key of block i)``, where the key
is the block's tokens followed by the hashes of any images among them (``Sequence.block_key``): two prompts with
the same image placeholder tokens but different images never share a block, nor any block after it.
A cache hit needs both the hash and the exact key to match, so a hash collision cannot alias two prefixes.

Three rules keep it correct where nano-vllm was not (a window pool's blocks, ``window_blocks.py``, follow them too):
* A block is registered in the cache only after a step has *computed* its KV, never at allocation.  So two
  identical prompts in the same step each compute their own block (no one reads a block not yet written),
  and a chunked prefill never hands out blocks whose KV is still pending.
* Only full blocks that end before a sequence's last token can be hits: at least one token is always left
  to compute, so a prompt that is entirely cached still produces logits.
* Freed blocks keep their hash until they are reused, so a preempted sequence (or a later request) can hit
  them again; freed blocks are reused least-recently-freed first.
"""
from collections import OrderedDict

import numpy as np
import xxhash

from nanovllm.engine.hybrid_state import StateSnapshots, capture_depths
from nanovllm.engine.sequence import Sequence
from nanovllm.engine.window_blocks import WindowBlocks


def chain_hash(prev_hash: int, tokens) -> int:
    h = xxhash.xxh64()
    h.update(prev_hash.to_bytes(8, "little"))
    h.update(np.asarray(tokens, dtype=np.int64).tobytes())
    return h.intdigest()


def block_chain(seq: Sequence, block_size: int, blocks: int | None = None) -> list[int]:
    """The chain hashes of the sequence's full blocks before its last token, or at least its first ``blocks`` of them
    (kept on it, and extended, while its tokens last)."""
    key, full = (len(seq), seq.token_ids[-1]), (len(seq) - 1) // block_size
    chain = seq.block_chain[1] if seq.block_chain is not None and seq.block_chain[0] == key else []
    want = full if blocks is None else min(blocks, full)
    h = chain[-1] if chain else 0
    for i in range(len(chain), want):
        h = chain_hash(h, seq.block_key(i * block_size, (i + 1) * block_size))
        chain.append(h)
    seq.block_chain = (key, chain)
    return chain


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, snapshots: StateSnapshots | None = None,
                 window: WindowBlocks | None = None):
        self.num_blocks = num_blocks
        self.snapshots = snapshots  # a hybrid model's: a hit must also find the state where it ends
        self.window = window  # a sliding-window model's window pool: a hit must also find the window where it ends
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.block_tokens: list[tuple | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.seq_hashes: dict[int, list[int]] = {}  # seq_id -> hashes of its registered blocks, in order
        self.cache_hit_tokens = 0  # total tokens served from the prefix cache (a statistic)
        # vLLM's prefix-cache statistics (its ``PrefixCacheStats``): prompt tokens looked up and those served from
        # the cache, at first admissions only (a readmission after preemption is not counted, nor a sequence that
        # wants its prompt logprobs, which takes no hit)
        self.prefix_cache_queries = self.prefix_cache_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def _take_free_block(self) -> int:
        block, _ = self.free_blocks.popitem(last=False)
        old = self.block_hash[block]
        if old is not None and self.hash_to_block.get(old) == block:
            del self.hash_to_block[old]
        self.block_hash[block] = None
        self.block_tokens[block] = None
        self.ref_counts[block] = 1
        return block

    def _cached_prefix(self, seq: Sequence) -> tuple[list[int], list[int], list[tuple]]:
        """Blocks (and their hashes and keys) that hold a computed copy of this sequence's leading full blocks."""
        blocks, hashes, keys, h = [], [], [], 0
        bs = self.block_size
        for i in range((len(seq) - 1) // bs):
            tokens = seq.block_key(i * bs, (i + 1) * bs)
            h = chain_hash(h, tokens)
            block = self.hash_to_block.get(h)
            if block is None or self.block_tokens[block] != tokens:
                break
            blocks.append(block)
            hashes.append(h)
            keys.append(tokens)
        return blocks, hashes, keys

    def try_allocate(self, seq: Sequence, chunk: int | None = None) -> bool:
        """Give a waiting sequence blocks for all its tokens, reusing cached ones; False if they don't fit, nor (a
        window pool's) the window blocks of its first ``chunk`` tokens to compute.  One that wants its prompt
        logprobs, or pools the mean of its tokens (``Sequence.skips_cache_hits``), takes no hit: a hit would skip
        positions it needs (it still publishes its blocks for others)."""
        assert not seq.block_table
        hits, hashes, keys = ([], [], []) if seq.skips_cache_hits else self._cached_prefix(seq)
        if self.window is not None and hits:  # only as deep as the window pool holds the window where it ends
            depth = self.window.cached_depth(hashes, keys)
            hits, hashes = hits[:depth], hashes[:depth]
        if self.snapshots is not None:  # a hybrid model: only as far as a state snapshot reaches
            depth = self.snapshots.deepest(hashes)
            kv_depth, hits, hashes = len(hits), hits[:depth], hashes[:depth]
        fresh_needed = self.blocks_for(len(seq)) - len(hits)
        revived = sum(1 for b in hits if self.ref_counts[b] == 0)
        if fresh_needed > self.num_free_blocks - revived:
            return False
        if self.window is not None and chunk is not None:
            start = len(hits) * self.block_size
            if not self.window.hit_room(hashes, keys, len(hits), start + min(chunk, len(seq) - start)):
                return False
        for b in hits:
            if self.ref_counts[b] == 0:
                del self.free_blocks[b]
            self.ref_counts[b] += 1
        seq.block_table = hits + [self._take_free_block() for _ in range(fresh_needed)]
        seq.num_computed_tokens = seq.num_cached_tokens = len(hits) * self.block_size
        self.cache_hit_tokens += seq.num_cached_tokens
        if not seq.num_preemptions and not seq.wants_prompt_logprobs:
            self.prefix_cache_queries += len(seq)
            self.prefix_cache_hits += seq.num_cached_tokens
        self.seq_hashes[seq.seq_id] = hashes
        if self.window is not None:
            self.window.take_hits(seq, hashes, keys, len(hits))
        if self.snapshots is not None:
            seq.state_restore = self.snapshots.slot(hashes[-1]) if hashes else None
            points = capture_depths(len(hits), (kv_depth, (len(seq) - 1) // self.block_size), self.block_size) \
                if self.snapshots.count else []
            seq.capture_points = [(n * self.block_size, self.prefix_hash(seq, n)) for n in points]
        return True

    def prefix_hash(self, seq: Sequence, num_blocks: int) -> int:
        """The chain hash of the sequence's first ``num_blocks`` blocks (full ones before its last token)."""
        return block_chain(seq, self.block_size, num_blocks)[num_blocks - 1] if num_blocks else 0

    def needs_block_to_append(self, seq: Sequence) -> bool:
        return len(seq.block_table) < self.blocks_for(len(seq))

    def decode_shortage(self, seq: Sequence) -> str | None:
        """What the sequence's next decode token (its newest) lacks: "full" (a free block, where its blocks have no
        room), "window" (the window blocks of it, ``window_reach``), or None."""
        n = len(seq)
        if self.needs_block_to_append(seq) and not self.free_blocks:
            return "full"
        return "window" if self.window is not None and self.window.reach(seq, n - 1) < n else None

    def append_block(self, seq: Sequence) -> None:
        """Give a decoding sequence the block its newest token needs (caller checked one is free)."""
        seq.block_table.append(self._take_free_block())

    def reserve_window(self, seq: Sequence, start: int, end: int) -> None:
        """Before a step that computes the sequence's tokens [start, end): its window blocks (``window_blocks.py``);
        nothing without a window pool."""
        if self.window is not None:
            self.window.reserve(seq, start, end)

    def window_reach(self, seq: Sequence, start: int) -> int:
        """The most tokens a step of the sequence from ``start`` may reach with the window blocks it can get
        (``WindowBlocks.reach``); no limit without a window pool."""
        return self.window.reach(seq, start) if self.window is not None else 1 << 62

    def reserve_decode_windows(self, seqs: list[Sequence], counts: list[int]) -> None:
        """``reserve_window`` for a decode step's sequences, of ``counts`` tokens each from its newest."""
        if self.window is not None:
            for seq, n in zip(seqs, counts):
                self.window.reserve(seq, len(seq) - 1, len(seq) - 1 + n)

    def release_windows(self, seqs: list[Sequence]) -> None:
        """Once a step of ``seqs`` is launched (or a verify step resolved): give back each live one's window blocks
        before the window of its next token (``WindowBlocks.release``)."""
        if self.window is not None:
            for seq in seqs:
                if seq.seq_id in self.seq_hashes:  # not freed since
                    self.window.release(seq, seq.num_computed_tokens)

    def register_computed(self, seq: Sequence, num_tokens: int | None = None) -> None:
        """Publish every full block whose KV is now computed (within the first ``num_tokens`` tokens, default
        ``seq.num_computed_tokens``: the caller leaves out tokens still being sampled), so later requests can
        hit it."""
        hashes = self.seq_hashes[seq.seq_id]
        bs = self.block_size
        h = hashes[-1] if hashes else 0
        limit = seq.num_computed_tokens if num_tokens is None else num_tokens
        for i in range(len(hashes), limit // bs):
            tokens = seq.block_key(i * bs, (i + 1) * bs)
            h = chain_hash(h, tokens)
            block = seq.block_table[i]
            self.block_hash[block] = h
            self.block_tokens[block] = tokens
            self.hash_to_block[h] = block
            hashes.append(h)
            if self.window is not None:
                self.window.register(seq, i, h, tokens)

    def reset_prefix_cache(self) -> None:
        """Forget every cached block (benchmarks: repeated runs of one workload must not hit each other's KV).

        Only allowed while no sequence holds blocks."""
        if len(self.free_blocks) != self.num_blocks:
            raise RuntimeError(f"reset_prefix_cache with {self.num_blocks - len(self.free_blocks)} blocks in use")
        self.hash_to_block.clear()
        self.block_hash = [None] * self.num_blocks
        self.block_tokens = [None] * self.num_blocks
        if self.window is not None:
            self.window.reset()

    def free(self, seq: Sequence) -> None:
        """Drop the sequence's references; its blocks stay hashed (reusable as cache) until reallocated."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
        seq.block_table = []
        if self.window is not None:
            self.window.free(seq)
        seq.num_computed_tokens = 0
        self.seq_hashes.pop(seq.seq_id, None)
