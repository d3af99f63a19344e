"""The engine loop: schedule a step, launch it on the model, then feed the oldest queued step's tokens back.

Up to ``pipeline_depth`` steps stay queued on the device (``StepPipeline``); a step's inputs take the newest tokens
from the device token buffer, so the host never waits for them and a host stall shorter than the queued work costs
nothing.  The price: a sequence that stops on EOS is already in the steps launched since, so up to
``pipeline_depth`` steps compute a row for it that is thrown away.  A step that samples for a sequence with a
grammar needs that sequence's last token on the host for its mask, so it runs in two halves: ``step()`` queues its
model half (``ModelRunner.launch_forward``), resolves the steps queued before it if one still samples such a token
(a decode step's) and fills the masks while the device runs the model, then queues the sampling half (``finish``).
``step()`` returns a ``StepResult`` (``outputs.py``): each sequence's newly resolved tokens and, on its last
output, its finish reason (and a request's prompt logprobs, on its first output); it is the engine's one output
channel.  ``abort(seq)`` ends a request at once, even while queued steps still hold its pending tokens, and frees
its KV blocks.  ``stats`` counts tokens, steps and host and device time (``reset_stats`` lists them).  A pooling
request (``PoolingParams``) is prefilled, samples nothing and ends there, its embedding on its one output.
"""
import dataclasses
import functools
import time
from typing import NamedTuple

import numpy as np

from nanovllm.config import EngineConfig
import nanovllm.distributed as distributed
from nanovllm.distributed import liveness
from nanovllm.engine import hybrid_state, lora_slots, pooling
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.outputs import StepResult, step_outputs
from nanovllm.engine.pipeline import StepPipeline
from nanovllm.engine.batch import ScheduledBatch
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import PENDING_TOKEN, ImageInputs, Sequence
from nanovllm.engine.spec_gate import SpecGate
from nanovllm.engine.window_blocks import window_pool
from nanovllm.platforms import get_platform
from nanovllm.pooling_params import PoolingParams
from nanovllm.sampling_params import SamplingParams

POOLING_SAMPLING = SamplingParams(temperature=0.0, max_tokens=1)  # a pooling request's: it samples nothing


class StepRecord(NamedTuple):
    """One entry of ``Engine.step_log``: an engine step's wall time, charged to the step whose work it waited for."""
    kind: str  # "prefill" or "decode"
    seqs: int  # sequences in that step
    start: float  # time.perf_counter() when the engine step began
    seconds: float  # its wall time
    wait: float  # of which blocked on the device
    launch: float  # of which scheduling, preparing and launching the next step (before the wait)


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.platform = get_platform(config.device)
        self.platform.check_tensor_parallel(config.tensor_parallel_size)
        self.runner = ModelRunner(config, self.platform)
        self.block_manager = BlockManager(self.runner.num_blocks, config.kvcache_block_size,
                                          hybrid_state.snapshots(self.runner), window_pool(self.runner))
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_model_len, config.eos_token_ids, config.mixed_prefill,
                                   self.runner.drafter or config.speculative)
        self.scheduler.loras = self.runner.loras
        self._rng = np.random.default_rng(config.seed)
        self._next_id = 0
        self.pipeline = StepPipeline(config.pipeline_depth, self.runner.new_host_tokens,
                                     adaptive=self.platform.queues_work and config.tensor_parallel_size == 1)
        self.stats: dict = {}
        self._spec_k = config.speculative.num_speculative_tokens if config.speculative is not None else 0
        self._state_moves: list[tuple[int, int]] = []  # (from, to) state slots to copy before the next step
        self.spec_gate = SpecGate(agree=functools.partial(distributed.agree_min, device=self.runner.device))
        self._waited_after_launch = False  # whether the last step() resolved a step after its launch
        self.reset_stats()
        self.step_log: list[StepRecord] | None = None  # set to a list to record every step

    def reset_stats(self) -> None:
        """Zero ``stats``: tokens, steps and wall seconds per step kind, ``host_time`` (seconds the host spent
        scheduling, preparing and bookkeeping), ``wait_time`` (seconds it waited for the device),
        ``decode_prepare_time`` (of the host time, building decode inputs), the KV tokens decode steps read
        (``decode_kv_tokens``), ``preemptions``, ``grammar_time`` (host seconds filling masks and advancing
        grammars, ``Grammars.seconds``), ``pipeline_depth`` (the steps kept queued now, ``pipeline.py``) and, with
        ``speculative_config``: verify steps, drafts (sequences with a proposal in one), proposed and kept tokens,
        and per proposal position (0 first) the drafts that reached it and those that kept it."""
        self.stats.update({"prefill_tokens": 0, "prefill_time": 0.0, "decode_tokens": 0, "decode_time": 0.0,
                           "decode_steps": 0, "prefill_steps": 0, "host_time": 0.0, "wait_time": 0.0,
                           "decode_prepare_time": 0.0, "decode_kv_tokens": 0, "preemptions": 0, "grammar_time": 0.0,
                           "pipeline_depth": self.pipeline.depth,
                           "spec_verify_steps": 0, "spec_drafts": 0, "spec_proposed_tokens": 0,
                           "spec_accepted_tokens": 0, "spec_proposed_by_position": [0] * self._spec_k,
                           "spec_accepted_by_position": [0] * self._spec_k})
        self.runner.grammars.seconds = 0.0

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (blocks in use stay), so the next prompts are computed in full."""
        self.block_manager.reset_prefix_cache()

    def add_lora(self, lora_request) -> None:
        """Check that a LoRA adapter loads and fits (``lora_slots.check``: ``ValueError`` naming it), before any
        request names it; as vLLM's ``add_lora``, it is then known by its id."""
        lora_slots.check(self.runner.loras, lora_request)

    def remove_lora(self, lora_int_id: int) -> None:
        """Forget a LoRA adapter (``lora_slots.remove``)."""
        lora_slots.remove(self.runner.loras, lora_int_id, self.scheduler.waiting)

    def build_variant_graphs(self, variant: str) -> None:
        """Build ``variant``'s graph of every decode bucket now (``nanovllm.step.VARIANTS``), rather than when a
        batch first asks for it: before a timed run, or ahead of time (``python -m nanovllm.precompile``)."""
        self.runner.executor.build_variant_graphs(variant)

    def describe(self) -> dict:
        """What this engine runs: platform, device, dtype, mode, KV cache, graphs, start-up phases, options."""
        cfg = self.config
        return {"platform": self.platform.name, "device": self.platform.arch(), **self.runner.describe(),
                "graph_batch_sizes": list(cfg.graph_batch_sizes), "max_num_seqs": cfg.max_num_seqs,
                "max_num_batched_tokens": cfg.max_num_batched_tokens, "pipeline_depth": cfg.pipeline_depth,
                "kernel_options": self.platform.options.as_dict(), **liveness.longest_waits()}

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams | PoolingParams,
                    images: ImageInputs | None = None, lora_request=None) -> Sequence:
        """Queue a request; ``images`` for a prompt with images (vision-language models), copied: each sequence
        keeps its own tower output while it prefills.  ``PoolingParams`` make it a pooling request, resolved against
        the engine's pooler (``PoolingParams.resolve`` raises ``ValueError`` first for what it refuses);
        ``lora_request`` the adapter it runs with (``lora_slots.check``)."""
        if lora_request is not None:
            lora_slots.check(self.runner.loras, lora_request)
        pooling = None
        if isinstance(params, PoolingParams):
            pooling, params = params.resolve(self.config.pooler, self.config.hf_config), POOLING_SAMPLING
        else:
            params.check_vocab(self.runner.vocab_size)  # ``logit_bias`` ids: only the engine knows its vocabulary
        seed = (params.seed % 2**63 if params.seed is not None else 0 if pooling is not None
                else int(self._rng.integers(0, 2**31 - 1)))  # a pooling request draws nothing
        images = dataclasses.replace(images, encoded=None) if images is not None else None
        seq = Sequence(self._next_id, prompt_token_ids, params, seed, images, pooling)
        seq.lora = lora_request
        if params.structured_outputs is not None:
            seq.grammar = self.runner.grammars.start(params.structured_outputs)
        self._next_id += 1
        self.scheduler.add(seq)
        return seq

    def step(self) -> StepResult:
        """Launch the next step, then finish the oldest queued one if ``pipeline_depth`` steps are queued after
        it (or if nothing was launched), and report what that one resolved (``outputs.py``).

        The host reads a step's tokens only after queueing later ones, which take their input tokens from the
        device token buffer, so scheduling and input preparation overlap the device's work.
        """
        t0 = time.perf_counter()
        stats = self.stats
        collected = []  # (step, its finished sequences) of each step resolved here, oldest first
        wait = 0.0
        speculating = self.config.speculative is not None
        if speculating and self.spec_gate.may_propose:  # proposals read every token (``spec_gate.py``)
            while len(self.pipeline):
                wait += self._collect(collected)
        batch = self.scheduler.schedule(propose=self.spec_gate.may_propose)
        if speculating and batch.seqs:  # steady: the engine waited on the device since the last launch
            self.spec_gate.launched(not batch.is_prefill, batch.proposals is not None,
                                    steady=bool(collected) or self._waited_after_launch)
        drained = len(collected)
        stats["preemptions"] += len(batch.preempted)
        if batch.seqs:
            batch.restores[:0], self._state_moves = self._state_moves, []  # before the step: what verifying kept
            if not batch.is_prefill:  # KV tokens this decode step reads: the byte floor's dominant term
                stats["decode_kv_tokens"] += sum(len(s.token_ids) for s in batch.seqs)
            slot = self.pipeline.next_slot()
            constrained = _constrained_samples(batch)
            if constrained and self.runner.splits(batch):
                kept, prepare_seconds = self.runner.launch_forward(batch, slot)
                # a grammar whose newest token a queued step still samples (a decode step's; a prefill's sequences
                # have none pending, as the scheduler readmits a preempted one only once its tokens are resolved)
                # fills its mask only once that step is resolved: resolve the steps before it meanwhile
                while len(self.pipeline) and any(seq.token_ids[-1] == PENDING_TOKEN for seq in constrained):
                    wait += self._collect(collected)
                event = self.runner.finish(batch, slot, kept)
            else:  # or an eager prefill: a prefilling sequence has no token pending, its mask is filled now
                event, prepare_seconds = self.runner.launch(batch, slot)
            self.pipeline.push(batch, slot, sum(batch.num_new_tokens) if batch.proposals else len(batch.seqs), event)
            stats["decode_prepare_time"] += prepare_seconds
        launched_at = time.perf_counter()
        launch = launched_at - t0 - wait
        steady = self._waited_after_launch
        if self.pipeline.should_collect(launched=bool(batch.seqs)):
            wait += self._collect(collected)
            while self.pipeline.should_collect(launched=True):  # the depth fell
                wait += self._collect(collected)
        self._waited_after_launch = len(collected) > drained
        if batch.seqs:
            self.scheduler.advance(batch)
        elapsed = time.perf_counter() - t0
        stats["wait_time"] += wait
        stats["host_time"] += elapsed - wait
        self.pipeline.paced(launched_at if batch.seqs else None, steady, elapsed - wait)
        stats["pipeline_depth"] = self.pipeline.depth
        stats["grammar_time"] = self.runner.grammars.seconds
        # Wall time is charged to the step whose device work it waited for, or else to the oldest queued one.
        previous = collected[-1][0] if collected else None
        oldest = self.pipeline.oldest()
        charged = previous if previous is not None else oldest if oldest is not None else batch
        if charged.seqs:
            kind = "prefill" if charged.is_prefill else "decode"
            stats[f"{kind}_time"] += elapsed
            if self.step_log is not None:
                self.step_log.append(StepRecord(kind, len(charged.seqs), t0, elapsed, wait, launch))
        computed = sum(batch.num_new_tokens)
        if batch.seqs:
            kind = "prefill" if batch.is_prefill else "decode"
            stats[f"{kind}_tokens"] += computed
            stats[f"{kind}_steps"] += 1
        outputs = [out for step, finished in collected for out in step_outputs(step, finished)]
        return StepResult(outputs, batch.is_prefill, computed)

    def _collect(self, collected: list) -> float:
        """Wait for the oldest queued step and resolve it (its tokens, logprobs and prompt logprobs; grammars
        advance over its tokens); appends (step, finished sequences) to ``collected``, returns the seconds waited."""
        t = time.perf_counter()
        previous, tokens, logprobs, prompt_logprobs = self.pipeline.collect()
        wait = time.perf_counter() - t
        if prompt_logprobs is not None:
            _record_prompt_logprobs(*prompt_logprobs)
        if previous.pooled is not None:
            pooling.finish(previous.pooled)
        finished = self.scheduler.resolve(previous, tokens, logprobs)
        if previous.proposals is not None:
            _count_speculation(self.stats, previous.proposals, previous.accepted)
            self.spec_gate.resolved(len(previous.seqs), sum(previous.accepted))
            if self.runner.hybrid:  # each sequence's state after its last accepted row (``hybrid_state.py``)
                self._state_moves += hybrid_state.verified_moves(previous, self.config.max_num_seqs, self._spec_k)
        resolved = [(seq.grammar, seq.token_ids[index]) for _, seq, index in previous.sampled
                    if seq.grammar is not None and index < len(seq.token_ids)]
        if resolved:
            self.runner.grammars.accept(resolved)
        collected.append((previous, finished))
        return wait

    def abort(self, seq: Sequence) -> bool:
        """End ``seq`` now, wherever it is (waiting, prefilling, decoding with tokens still pending in queued
        steps): its KV blocks and token slot are freed at once and no later step reports it.  Returns False
        if it had already finished."""
        return self.scheduler.abort(seq)

    def close(self) -> None:
        """Release the device memory: the executor's graphs, the KV cache, the model and the token buffers
        (idempotent).  Steps already queued finish first; the engine cannot step afterwards."""
        self.runner.close()

    def has_work(self) -> bool:
        return len(self.pipeline) > 0 or self.scheduler.has_work()


def _count_speculation(stats: dict, proposals: list[list[int]], accepted: list[int]) -> None:
    """Add a resolved verify step to ``stats`` (``Engine.reset_stats``)."""
    stats["spec_verify_steps"] += 1
    proposed_at, accepted_at = stats["spec_proposed_by_position"], stats["spec_accepted_by_position"]
    for proposal, kept in zip(proposals, accepted):
        stats["spec_drafts"] += bool(proposal)
        stats["spec_proposed_tokens"] += len(proposal)
        stats["spec_accepted_tokens"] += kept
        for i in range(len(proposal)):
            proposed_at[i] += 1
            accepted_at[i] += i < kept


def _constrained_samples(batch: ScheduledBatch) -> list[Sequence]:
    """The sequences with a grammar whose next token ``batch`` samples."""
    return [seq for seq, samples in zip(batch.seqs, batch.sampling()) if seq.grammar is not None and samples]


def _record_prompt_logprobs(groups: list, values, ids) -> None:
    """Append a resolved prefill step's prompt logprobs (``StepSlot.prompt_logprobs``) to their sequences: each
    group's rows are positions ``first`` .. ``first + count - 1`` of its prompt, in order."""
    row = 0
    for seq, first, count in groups:
        assert len(seq.prompt_logprobs) == first, "prompt logprobs resolve in position order"
        k = seq.params.prompt_logprobs
        v, i = values[row:row + count], ids[row:row + count]
        seq.prompt_logprobs += zip(seq.token_ids[first:first + count], v[:, 0].tolist(), i[:, :k].tolist(),
                                   v[:, 1:k + 1].tolist())
        row += count
