"""Continuous batching, prefill first, with chunked prefill and preemption by recompute.

Each step is either a prefill step (chunks of prompts, at most ``max_num_batched_tokens`` tokens) or a
decode step (one token for every running sequence whose prompt is done).  Prefill wins whenever there is
prefill work that fits.  When the KV cache cannot hold the next decode token of every running sequence,
the most recently admitted one is preempted: its blocks are freed (they stay in the prefix cache) and it
goes back to the front of the queue to be recomputed.  No request is ever dropped.
"""
from collections import deque
from dataclasses import dataclass

from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    seqs: list[Sequence]
    num_new_tokens: list[int]  # per sequence: tokens computed this step, starting at seq.num_computed_tokens
    is_prefill: bool

    def samples(self, seq_index: int) -> bool:
        """Whether this step reaches the sequence's last token, so its sampled token is kept."""
        seq = self.seqs[seq_index]
        return seq.num_computed_tokens + self.num_new_tokens[seq_index] == len(seq)


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_ids: tuple[int, ...]):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledBatch:
        batch = self._schedule_prefill()
        if batch.seqs:
            return batch
        return self._schedule_decode()

    def _schedule_prefill(self) -> ScheduledBatch:
        seqs, counts, budget = [], [], self.max_num_batched_tokens
        for seq in self.running:  # unfinished chunked prefills continue first
            if budget and seq.is_prefilling:
                n = min(len(seq) - seq.num_computed_tokens, budget)
                seqs.append(seq)
                counts.append(n)
                budget -= n
        while self.waiting and budget and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.block_manager.try_allocate(seq):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            n = min(len(seq) - seq.num_computed_tokens, budget)
            seqs.append(seq)
            counts.append(n)
            budget -= n
        return ScheduledBatch(seqs, counts, is_prefill=True)

    def _schedule_decode(self) -> ScheduledBatch:
        bm = self.block_manager
        scheduled: list[Sequence] = []
        queue = list(self.running)
        head, tail = 0, len(queue)  # queue[head:tail] are still to be scheduled
        while head < tail:
            seq = queue[head]
            head += 1
            while bm.needs_block_to_append(seq) and bm.num_free_blocks == 0:
                victim = queue[tail - 1] if tail > head else seq
                tail -= victim is not seq
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                if bm.needs_block_to_append(seq):
                    bm.append_block(seq)
                scheduled.append(seq)
        if not scheduled and self.running:
            raise RuntimeError("KV cache too small to decode even one sequence; raise num_kvcache_blocks")
        return ScheduledBatch(scheduled, [1] * len(scheduled), is_prefill=False)

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def postprocess(self, batch: ScheduledBatch, token_ids: list[int]) -> list[Sequence]:
        """Advance each sequence by this step's work; append sampled tokens; return those that finished."""
        finished = []
        bm = self.block_manager
        for i, (seq, token) in enumerate(zip(batch.seqs, token_ids)):
            sampled = batch.samples(i)
            seq.num_computed_tokens += batch.num_new_tokens[i]
            if seq.num_computed_tokens // bm.block_size > len(bm.seq_hashes[seq.seq_id]):
                bm.register_computed(seq)  # a block just filled up
            if not sampled:
                continue
            seq.token_ids.append(token)
            if self._should_stop(seq, token):
                seq.status = SequenceStatus.FINISHED
                self.block_manager.free(seq)
                self.running.remove(seq)
                finished.append(seq)
        return finished

    def _should_stop(self, seq: Sequence, token: int) -> bool:
        p = seq.params
        if not p.ignore_eos and token in self.eos_token_ids:
            return True
        if token in p.stop_token_ids:
            return True
        return seq.num_completion_tokens >= p.max_tokens or len(seq) >= self.max_model_len
