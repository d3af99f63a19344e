"""``ScheduledBatch``: one step the scheduler chose (``scheduler.py``): its sequences, the tokens each computes, whether
it is a prefill, and what the step carries besides (a hybrid model's state copies, pooled outputs)."""
from dataclasses import dataclass, field

from nanovllm.engine.sequence import Sequence


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # per sequence: tokens computed this step, starting at seq.num_computed_tokens
    is_prefill: bool
    preempted: list[Sequence] = field(default_factory=list)  # sent back to the queue while scheduling this
    # (row, seq, index in seq.token_ids) of every PENDING_TOKEN this step put in
    sampled: list[tuple[int, Sequence, int]] = field(default_factory=list)
    finished: list[Sequence] = field(default_factory=list)  # finished on length by ``advance``
    # a verify step's tokens proposed after each sequence's newest (``num_new_tokens``: 1 + their number), and
    proposals: list[list[int]] | None = None  # once resolved, how many of each were kept
    accepted: list[int] = field(default_factory=list)
    # a hybrid model's state copies (``hybrid_state.py``): (from slot, to slot) before the step, and after it
    restores: list[tuple[int, int]] = field(default_factory=list)
    captures: list[tuple[int, int]] = field(default_factory=list)
    # ... and snapshots taken inside the step: seq_id -> (snapshot slot, tokens of its chunk before the boundary)
    inner_captures: dict[int, tuple[int, int]] = field(default_factory=dict)
    pooled: tuple | None = None  # set at launch: (pooling sequences it ends, their vectors' host copy), pooling.py

    def samples(self, seq_index: int) -> bool:
        """Whether this step reaches the sequence's last token, so its sampled token is kept (never a pooling one's)."""
        seq = self.seqs[seq_index]
        return seq.num_computed_tokens + self.num_new_tokens[seq_index] == len(seq) and seq.pooling is None

    def sampling(self) -> list[bool]:
        """Per sequence: whether this step samples its next token (every decode row; a prefill chunk that samples)."""
        return [not self.is_prefill or self.samples(i) for i in range(len(self.seqs))]
