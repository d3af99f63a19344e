"""Prompts that arrive together sharing a prefix no cache holds yet (a burst of conversations on a new system
prompt): the first computes it, the others wait a step and hit it.

Blocks reach the prefix cache when their step is launched, so prompts admitted in one step each compute the prefix
they share; and a hybrid model's hit also needs a state snapshot where the shared part ends, which no prompt takes on
its own (``hybrid_state.py``).  When the scheduler admits a prompt, ``PrefixSharing.lead`` looks at the next
``LOOKAHEAD`` waiting ones.  Those that share at least half of what they would compute with it make it a leader, at
the depth that saves the most tokens (a hybrid model's moved down to a ``CAPTURE_ALIGN`` boundary, and snapshotted
there).  ``waits`` keeps them queued, in their places, while a leader in the step being built computes up to that
depth; prompts behind them may go first.  The step after, they hit it: the tokens a cold run gives.  Not for a
sliding-window model, whose hits depend on its window pool.
"""
from itertools import islice

from nanovllm.engine.block_manager import BlockManager, block_chain
from nanovllm.engine.hybrid_state import capture_depths
from nanovllm.engine.sequence import PENDING_TOKEN, Sequence, SequenceStatus

LOOKAHEAD = 256  # waiting prompts an admitted one is compared with


def common_blocks(a: list[int], b: list[int]) -> int:
    """Leading blocks two chains share (a chain hash covers every block before it, so the shared part is a prefix)."""
    lo, hi = 0, min(len(a), len(b))
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[mid - 1] == b[mid - 1]:
            lo = mid
        else:
            hi = mid - 1
    return lo


class PrefixSharing:
    def __init__(self, block_manager: BlockManager):
        self.bm = block_manager
        self.on = block_manager.window is None
        self.leaders: list[Sequence] = []  # the step being built's, with the depth (blocks) each leads to
        self._by_first: dict[int, list[Sequence]] | None = None  # the step's waiting prompts by their first block
        self.deferred = 0  # admissions put off behind a leader (a statistic)

    def begin(self, running: list[Sequence]) -> None:
        """A step starts: running prompts still short of the depth they lead to lead in it too."""
        bs = self.bm.block_size
        self.leaders = [s for s in running if s.lead_depth * bs > s.num_computed_tokens] if self.on else []
        self._by_first = None

    def _first(self, seq: Sequence) -> int | None:
        chain = block_chain(seq, self.bm.block_size, 1)
        return chain[0] if chain else None

    def _shares(self, leader: Sequence, seq: Sequence, depth: int) -> bool:
        """Whether ``seq`` shares ``depth`` of the leader's blocks, past the leader's hit, and that is at least half
        of what it would compute."""
        start = leader.num_cached_tokens
        shared = depth * self.bm.block_size - start
        return shared > 0 and 2 * shared >= len(seq) - start

    def waits(self, seq: Sequence) -> bool:
        """Whether a waiting prompt should wait for a leader of this step instead of computing what it shares."""
        first = self._first(seq) if self.leaders and not seq.skips_cache_hits else None
        if first is None:
            return False
        bs = self.bm.block_size
        for leader in self.leaders:
            if first == self._first(leader) and self._shares(leader, seq, leader.lead_depth) \
                    and common_blocks(block_chain(seq, bs), block_chain(leader, bs)) >= leader.lead_depth:
                self.deferred += 1
                return True
        return False

    def lead(self, seq: Sequence, waiting) -> None:
        """A prompt was just admitted (its blocks allocated, no chunk cut yet): make it a leader if waiting prompts
        share enough with it, snapshotting a hybrid model's state at the depth it leads to."""
        seq.lead_depth = 0
        if not self.on:
            return
        bs = self.bm.block_size
        if self._by_first is None:  # once a step: the waiting prompts that may share a first block with another
            self._by_first = {}
            for other in islice(waiting, LOOKAHEAD):
                if not other.skips_cache_hits and other.token_ids[-1] != PENDING_TOKEN:
                    self._by_first.setdefault(self._first(other), []).append(other)
        first = self._first(seq)
        others = [o for o in self._by_first.get(first, ()) if o is not seq and o.status is SequenceStatus.WAITING]
        if first is None or not others:
            return
        chain, start = block_chain(seq, bs), seq.num_cached_tokens // bs
        depths = []
        for other in others:
            depth = common_blocks(chain, block_chain(other, bs))
            if self._shares(seq, other, depth):
                depths.append(depth)
        snapshots = self.bm.snapshots
        if snapshots is not None:  # where the kernels snapshot it during the step
            depths = [a for d in depths for a in capture_depths(start, (d,), bs)] if snapshots.count else []
        if not depths:
            return
        depths.sort(reverse=True)  # the depth that saves the most: its tokens times the prompts that reach it
        _, seq.lead_depth = max(((d - start) * (i + 1), d) for i, d in enumerate(depths))
        self.leaders.append(seq)
        if snapshots is not None:  # its own boundaries would cut its chunk: the shared one serves the most
            seq.capture_points = [(seq.lead_depth * bs, chain[seq.lead_depth - 1])]
