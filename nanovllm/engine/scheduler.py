"""Continuous batching, prefill first, with chunked prefill and preemption by recompute.

A step is a prefill (chunks of prompts, at most ``max_num_batched_tokens`` tokens; ``mixed_prefill`` adds a token
of each decoding sequence that fits) or a decode (a token of each running sequence past its prompt); prefill wins
when prefill work fits; a prompt sharing an uncached prefix with one just admitted waits a step to hit it
(``shared_prefix.py``).  When the KV cache (or window pool) cannot hold every running sequence's next token, the
last admitted is preempted: its blocks are freed (kept in the prefix cache), it goes back to the queue's front.

Steps are launched ahead of their tokens (``pipeline_depth``): ``advance`` (at launch) moves sequences forward, puts a
``PENDING_TOKEN`` where a token is sampled and finishes on length; ``resolve`` (later) writes the tokens in and
finishes on EOS or stop tokens (cutting the tokens after it, as ``abort`` does).  A full block is published to the
prefix cache once its tokens are resolved, and a preempted sequence is readmitted only then.
A decode step may verify proposals (``proposals.py``).  It owns a running sequence's KV blocks, token slot and LoRA
slot pin (``lora_slots.py``; with none free it waits, up to ``max_num_seqs`` behind it going first), handed out on
admission and taken back on preemption, finish and abort.
"""
from collections import deque

from nanovllm.engine.batch import ScheduledBatch
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.hybrid_state import cut_chunk
from nanovllm.engine.sequence import PENDING_TOKEN, Sequence, SequenceStatus
from nanovllm.engine.shared_prefix import PrefixSharing
from nanovllm.engine.proposals import propose, resolve_verify


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, eos_token_ids: tuple[int, ...], mixed_prefill: bool, speculative=None):
        self.block_manager, self.mixed_prefill, self.max_model_len = block_manager, mixed_prefill, max_model_len
        self.max_num_seqs, self.max_num_batched_tokens = max_num_seqs, max_num_batched_tokens
        self.eos_token_ids = frozenset(eos_token_ids)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.window_preemptions = 0  # of them, those for want of a window block (the full pool had room)
        self.free_slots = list(range(max_num_seqs - 1, -1, -1))  # token slots of no running sequence
        self._unpublished: set[Sequence] = set()  # running, with a computed full block that holds a pending token
        self.speculative = speculative  # the proposer of decode steps (``proposals.py``), or None
        self.loras = None  # the engine's LoRA adapters (``lora_slots.EngineLoras``), with ``enable_lora``
        self.sharing = PrefixSharing(block_manager)  # prompts admitted a step after the prefix they share

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, propose: bool = True) -> ScheduledBatch:
        """The next step: a prefill while prompts wait and fit, else a decode step (which verifies proposals
        where ``propose`` allows and the proposer has some, ``proposals.py``)."""
        batch = self._schedule_prefill()  # (a prefill may preempt, for window blocks, and still schedule none)
        return batch if batch.seqs else self._schedule_decode(propose, batch.preempted)

    def _schedule_prefill(self) -> ScheduledBatch:
        seqs, counts, budget = [], [], self.max_num_batched_tokens
        batch = ScheduledBatch(seqs, counts, is_prefill=True)
        snapshots = self.block_manager.snapshots

        def add_chunk(seq: Sequence) -> int:  # the sequence's next chunk, within the budget and the window blocks
            start = seq.num_computed_tokens  # it can get (``window_reach``); returns its tokens
            n = min(len(seq) - start, budget, bm.window_reach(seq, start) - start)
            n = cut_chunk(seq, n, snapshots, batch)
            bm.reserve_window(seq, start, start + n)  # within its reach: no fail
            seqs.append(seq)
            counts.append(n)
            return n

        bm = self.block_manager
        self.sharing.begin(self.running)
        for seq in list(self.running):  # unfinished chunked prefills continue first (preempted since: not)
            if budget and seq.is_prefilling and seq.status is SequenceStatus.RUNNING \
                    and self._window_room(seq, batch.preempted):
                budget -= add_chunk(seq)
        passed = []  # waiting sequences whose LoRA adapter has no free slot: those behind them may go first
        held = []  # those and the ones waiting for a leader's prefix (``shared_prefix.py``), in queue order
        while self.waiting and budget and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.token_ids[-1] == PENDING_TOKEN:  # preempted with tokens still being sampled: wait for them
                break
            if passed and max(p.lora_passed_by for p in passed) >= self.max_num_seqs:
                break  # a batch went past one waiting for a LoRA slot: the rest wait until it has one
            if self.sharing.waits(seq):
                held.append(self.waiting.popleft())
                continue
            if self.loras is not None and not self.loras.admit(seq):  # every slot pinned by other adapters
                passed.append(self.waiting.popleft())
                held.append(passed[-1])
                continue
            if not bm.try_allocate(seq, budget):  # its blocks, and its first chunk's window blocks
                if self.loras is not None:
                    self.loras.release(seq)
                break
            self.waiting.popleft()
            for p in passed:
                p.lora_passed_by += 1
            seq.status = SequenceStatus.RUNNING
            seq.token_slot = self.free_slots.pop()  # running sequences <= max_num_seqs: one is free
            self.running.append(seq)
            self.sharing.lead(seq, self.waiting)
            budget -= add_chunk(seq)
        self.waiting.extendleft(reversed(held))  # in their places at the queue's front
        if seqs and budget and self.mixed_prefill:
            self._add_decode_rows(seqs, counts, budget)
        if snapshots is not None:
            snapshots.commit()
        return batch

    def _add_decode_rows(self, seqs: list[Sequence], counts: list[int], budget: int) -> None:
        """Let running sequences past their prompt ride in this prefill step, one token each (their newest, which
        may still be pending), while the budget lasts, so they do not stall while prompts arrive.  Not a
        constrained one (its mask waits for its tokens), one whose next block no free block holds, in either pool
        (it waits for a decode step, which may preempt), nor any in a step that runs eagerly (prompt logprobs or images)."""
        if any(s.wants_prompt_logprobs or s.images is not None for s in seqs):
            return
        bm, taken = self.block_manager, {s.seq_id for s in seqs}
        for seq in self.running:
            if not budget:
                break
            if seq.seq_id in taken or seq.is_prefilling or seq.grammar is not None:
                continue
            if bm.decode_shortage(seq):
                continue
            if bm.needs_block_to_append(seq):
                bm.append_block(seq)
            bm.reserve_window(seq, seq.num_computed_tokens, seq.num_computed_tokens + 1)
            seqs.append(seq)
            counts.append(1)
            budget -= 1

    def _schedule_decode(self, propose_now: bool, preempted: list[Sequence]) -> ScheduledBatch:
        bm, scheduled = self.block_manager, []
        queue = list(self.running)
        head, tail = 0, len(queue)  # queue[head:tail] are still to be scheduled
        block_size, windowed = bm.block_size, bm.window is not None
        while head < tail:
            seq = queue[head]
            head += 1
            n = len(seq.token_ids)  # the common case: its blocks, and its window's, have room
            if len(seq.block_table) * block_size >= n and (not windowed or len(seq.window_table) * block_size >= n):
                scheduled.append(seq)
                continue
            while short := bm.decode_shortage(seq):
                victim = queue[tail - 1] if tail > head else seq
                tail -= victim is not seq
                self._preempt(victim)
                self.window_preemptions += short == "window"
                preempted.append(victim)
                if victim is seq:
                    break
            else:
                if bm.needs_block_to_append(seq):
                    bm.append_block(seq)
                bm.reserve_window(seq, n - 1, n)
                scheduled.append(seq)
        if not scheduled and self.running:
            raise RuntimeError("KV cache too small to decode even one sequence; raise num_kvcache_blocks")
        # Longest context first: the decode attention kernel's programs start in row order, so the longest
        # ones start earliest and the last wave holds the shortest (less idle tail when lengths are mixed).
        scheduled.sort(key=len, reverse=True)
        proposals = propose(scheduled, self.speculative if propose_now else None, bm, self.max_model_len)
        counts = [1 + len(p) for p in proposals] if proposals is not None else [1] * len(scheduled)
        bm.reserve_decode_windows(scheduled, counts)
        return ScheduledBatch(scheduled, counts, is_prefill=False, preempted=preempted, proposals=proposals)

    def _window_room(self, seq: Sequence, preempted: list[Sequence]) -> bool:
        """Preempt the newest running sequences till a prefilling one's next token has its window block; False if
        it went itself."""
        while self.block_manager.window_reach(seq, seq.num_computed_tokens) <= seq.num_computed_tokens:
            victim = self.running[-1]
            self._preempt(victim)
            self.window_preemptions += 1
            preempted.append(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        self.running.remove(seq)
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
        seq.num_preemptions += 1

    def advance(self, batch: ScheduledBatch) -> None:
        """Account for a launched step: computed tokens, new full blocks, a ``PENDING_TOKEN`` per sample; a pooling
        sequence whose prompt it completes finishes ("stop"), reported once the step resolves."""
        # The host runs this for every sequence of every step, so it is written for speed: ``batch.samples`` and
        # ``Sequence`` properties inlined, and a decode step samples every sequence.
        if batch.proposals is not None:  # a verify step: its tokens are known only when it resolves
            return
        block_size, hashes, decode = self.block_manager.block_size, self.block_manager.seq_hashes, not batch.is_prefill
        for i, (seq, n) in enumerate(zip(batch.seqs, batch.num_new_tokens)):
            if seq.status is SequenceStatus.FINISHED:  # hit EOS in the step resolved since this one launched
                continue
            tokens = seq.token_ids
            computed = seq.num_computed_tokens + n
            seq.num_computed_tokens = computed
            if computed // block_size > len(hashes[seq.seq_id]):
                self.publish(seq)  # a block just filled up
            if not (decode or computed == len(tokens)):  # a prefill chunk short of the last token samples nothing
                continue
            if seq.pooling is not None:  # a pooling request ends with its prompt; it is reported once resolved
                self.finish(seq, "stop")
                batch.finished.append(seq)
                continue
            batch.sampled.append((i, seq, len(tokens)))
            tokens.append(PENDING_TOKEN)
            if len(tokens) - seq.num_prompt_tokens >= seq.params.max_tokens or len(tokens) >= self.max_model_len:
                self.finish(seq, "length")
                batch.finished.append(seq)
        self.block_manager.release_windows(batch.seqs)  # (once published: a released block keeps its hash)

    def resolve(self, batch: ScheduledBatch, token_ids: list[int], logprobs=None) -> list[Sequence]:
        """Write an advanced step's sampled tokens in; return the sequences that are now complete.

        ``logprobs``: the step's (values [rows, 1 + MAX_LOGPROBS], ids [rows, MAX_LOGPROBS]) when a sequence of
        the batch asked for them (``ModelRunner``).  Steps are resolved in launch order, so each token filled in
        is its sequence's oldest pending one, and ``seq.logprobs`` stays one entry per resolved token."""
        if batch.proposals is not None:
            return resolve_verify(self, batch, token_ids)
        finished = list(batch.finished)
        for row, seq, index in batch.sampled:
            if index >= len(seq.token_ids):  # cut off after an EOS resolved in an earlier step, or aborted
                continue
            token = token_ids[row]
            assert seq.token_ids[index] == PENDING_TOKEN
            seq.token_ids[index] = token
            if seq.logprobs is not None:
                values, ids = logprobs
                k = seq.params.logprobs
                seq.logprobs.append((float(values[row, 0]), ids[row, :k].tolist(), values[row, 1:k + 1].tolist()))
            if self.stops_on(seq, token, index):
                del seq.token_ids[index + 1:]  # tokens sampled after the stop token, by steps already launched
                if seq.status is not SequenceStatus.FINISHED:
                    self.finish(seq, "stop")
                    finished.append(seq)
                else:  # finished on length by a later step's ``advance``; reported when that step resolves
                    seq.finish_reason = "stop"
        if self._unpublished:
            for seq in list(self._unpublished):
                self.publish(seq)
        return finished

    def publish(self, seq: Sequence) -> None:
        """Register the sequence's computed full blocks whose tokens are all resolved; remember it if a pending
        token holds one back."""
        resolved = len(seq.token_ids)
        while resolved and seq.token_ids[resolved - 1] == PENDING_TOKEN:
            resolved -= 1
        bm = self.block_manager
        bm.register_computed(seq, min(seq.num_computed_tokens, resolved))
        if seq.num_computed_tokens // bm.block_size > len(bm.seq_hashes[seq.seq_id]):
            self._unpublished.add(seq)
        else:
            self._unpublished.discard(seq)

    def abort(self, seq: Sequence) -> bool:
        """End an unfinished sequence now (False if it had finished): its pending tokens are cut, so the steps
        still queued skip it when they resolve, and its blocks and token slot are freed (their late writes are
        harmless, as after an EOS)."""
        if seq.status is SequenceStatus.FINISHED:
            return False
        del seq.token_ids[seq.num_resolved_tokens:]
        self.finish(seq, "abort")
        return True

    def finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:  # preempted while its last token was still pending
            self.waiting.remove(seq)
        seq.status = SequenceStatus.FINISHED
        self._release(seq)

    def _release(self, seq: Sequence) -> None:
        """Give back the sequence's KV blocks, adapter pin and token slot (a preempted one may hold none any more)."""
        self.block_manager.free(seq)
        if self.loras is not None:
            self.loras.release(seq)
        self._unpublished.discard(seq)
        if seq.token_slot is not None:
            self.free_slots.append(seq.token_slot)
            seq.token_slot = None

    def stops_on(self, seq: Sequence, token: int, index: int) -> bool:
        """Whether ``token``, at ``index`` of ``seq``, ends it (never before ``min_tokens`` completion tokens)."""
        if index + 1 - seq.num_prompt_tokens < seq.params.min_tokens:
            return False
        return (not seq.params.ignore_eos and token in self.eos_token_ids) or token in seq.params.stop_token_ids
