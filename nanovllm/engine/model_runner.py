"""``ModelRunner``: one model on one device, turning a scheduled batch into a launched step.

It owns the model (``nanovllm.models.build_model``), its KV cache (``kv_cache.py``), the device token buffer
(one row per running sequence, its "token slot", plus a scratch row), the input builders and the executor
(``nanovllm/compile``).  ``launch`` queues a step and copies its tokens, in the background, to the host buffer of
the engine's ``StepSlot``.  A batch in which a request asked for logprobs, penalties or a grammar runs that variant
of the step (``nanovllm.step.STEPS``; the per-slot rows of penalties and masks are ``logits_slots.py``'s); other
batches run the plain step and pay nothing.  A batch in which a constrained sequence samples is launched in two
halves: ``launch_forward`` queues the model, the engine resolves the earlier steps meanwhile, and ``finish`` fills
the grammar masks and samples.  A prefill that reaches image tokens (``image_step.py``) or computes prompt logprobs
(``run_step_with_prompt_logprobs``; to the slot's ``prompt_logprobs``) runs eagerly and whole; a speculative verify
step is ``verify_step.py``'s.  A prefill's pooling rows are reduced from its outputs' hidden states as soon as it is
queued (``pooling.py``).  Start-up probes and calibration are ``runner_setup.py``'s."""
import functools
import time

import torch

import nanovllm.distributed as distributed
from nanovllm.distributed import liveness
from nanovllm.compile.cache import key_fields
from nanovllm.compile.base import ExecutorSpec, Part, step_outputs
from nanovllm.compile.factory import make_executor, round_like_eager
from nanovllm.config import EngineConfig
from nanovllm.engine import hybrid_state, image_step, pooling, runner_report, runner_setup, verify_step
from nanovllm.engine.decode_inputs import DecodeInputBuilder
from nanovllm.engine.grammar import Grammars
from nanovllm.engine.kv_cache import KVCacheSpec, plan_num_blocks, register_engine
from nanovllm.engine.logits_slots import LogitsSlots
from nanovllm.engine.pipeline import StepSlot
from nanovllm.engine.prefill_inputs import PrefillInputBuilder, prompt_logprob_rows
from nanovllm.engine.batch import ScheduledBatch
from nanovllm.models.expert_offload import expert_caches
from nanovllm.models.loader import build_model
from nanovllm.sampling_params import MAX_BIASED_TOKENS, MAX_LOGPROBS
from nanovllm.step import (VARIANTS, LogitsState, StepInputs, make_step, rechoose_logprob, redraw_filtered,
                           variant_name)
from nanovllm.step.prompt_logprobs import run_step_with_prompt_logprobs


class ModelRunner:
    def __init__(self, config: EngineConfig, platform):
        self.init_phases: dict[str, float] = {}  # start-up seconds per phase, for the "ready" log line
        clock = time.perf_counter()

        def phase(name: str, next_activity: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            self.init_phases[name] = round(now - clock, 2)
            clock = now
            liveness.doing(next_activity)  # what a tensor-parallel rank's beat reports it is doing

        liveness.doing("building the model")

        self.config, self.platform, self.device = config, platform, platform.device
        hf = config.hf_config
        self.dtype = platform.resolve_dtype(config.dtype, hf.get("torch_dtype") or hf.get("dtype"))
        self.model = build_model(hf, dtype=self.dtype, device=self.device, model_dir=config.model,
                                 load_format=config.load_format, seed=config.seed,
                                 offload_experts=config.offload_experts, experts_on_device=config.experts_on_device,
                                 offload_host_share=config.offload_host_share,
                                 scheme=config.quant_scheme, online=config.online_scheme)
        self.loras, self.drafter = runner_setup.beside_model(self)  # LoRA pool, draft model: before KV sizing
        phase("build_model", "sizing the KV cache")
        a = self.model.args
        self.vocab_size = a.vocab_size
        self.block_size = config.kvcache_block_size
        self.max_blocks_per_seq = -(-config.max_model_len // self.block_size)
        self.kv_spec = KVCacheSpec.of_model(self.model, self.block_size,
                                            platform.kv_cache_dtype(config.kv_cache_dtype, self.dtype))
        self.hybrid = runner_setup.plan_pools(self)
        self.scratch_slot = config.max_num_seqs
        self.token_buffer = torch.zeros(config.max_num_seqs + 1, dtype=torch.int64, device=self.device)
        self.logits_state = LogitsState.allocate(config.max_num_seqs + 1, self.vocab_size, self.device, self.dtype,
                                                 MAX_BIASED_TOKENS + len(config.eos_token_ids))
        self.grammars = Grammars(config.model, self.vocab_size, config.eos_token_ids)
        self.logits_slots = LogitsSlots(self.logits_state, platform, self.grammars, config.eos_token_ids)
        builder_args = dict(device=self.device, pin_memory=platform.pin_memory, block_size=self.block_size,
                            table_width=self.max_blocks_per_seq, scratch_slot=self.scratch_slot)
        self.prefill_builder = PrefillInputBuilder(max_model_len=config.max_model_len, **builder_args)
        self.decode_builder = DecodeInputBuilder(**builder_args)
        self.kv_scales = runner_setup.set_kv_scales(self) if config.fp8_kv_cache else None
        self.num_blocks = plan_num_blocks(
            self.kv_spec, fixed=config.num_kvcache_blocks, utilization=config.gpu_memory_utilization,
            platform=platform, max_blocks_per_seq=self.max_blocks_per_seq, max_model_len=config.max_model_len,
            probe=functools.partial(runner_setup.probe_peak_memory, self),
            agree=functools.partial(distributed.agree_min, device=self.device),  # one size on every rank
            draft=self.drafter.kv_spec if self.drafter is not None else None)
        self.kv_caches = runner_setup.allocate_kv_cache(self)
        register_engine(self)
        rows = max(config.max_num_seqs, *config.graph_batch_sizes)  # a verify step's may exceed max_num_seqs
        platform.prepare_tensor_parallel(self.dtype, rows * a.hidden_size)
        phase("size_kv_cache", "making the executor (graph mode: compiling and capturing)")
        round_like_eager(self.model)  # before the compile-cache key, which records it
        spec = ExecutorSpec(
            step=make_step(self.model, self.kv_caches, self.token_buffer),
            variants={name: make_step(self.model, self.kv_caches, self.token_buffer, name, self.logits_state)
                      for name in VARIANTS}, platform=platform,
            graph_batch_sizes=config.graph_batch_sizes, prefill_graph_sizes=config.prefill_graph_sizes,
            max_num_seqs=config.max_num_seqs, max_step_tokens=config.max_step_tokens,
            dummy_prefill=self.prefill_builder.dummy,
            decode_inputs=functools.partial(self.decode_builder.build, []),  # not a closure over the runner
            cache_key=key_fields(config, dtype=self.dtype, kv_dtype=self.kv_spec.dtype, num_kv_blocks=self.num_blocks,
                                 platform=platform, num_window_blocks=self.kv_spec.num_window_blocks(self.num_blocks)))
        self.executor = make_executor(spec, enforce_eager=config.enforce_eager,
                                      capturable=self.model.graph_capturable,
                                      not_capturable_reason=self.model.not_capturable_reason)
        self.mode = self.executor.mode
        if self.drafter is not None:
            self.drafter.start(self.num_blocks, functools.partial(self.prefill_builder.dummy, windowed=False))
        phase("compile_and_capture" if self.mode == "graph" else "executor", "warming the largest prefill")
        if platform.supports_graph_capture and not self.executor.captures_every_prefill():
            runner_setup.warm_largest_prefill(self)
            phase("warm_largest_prefill", "ready")

    def describe(self) -> dict:
        """What this runner is, for the start-up log line and benchmarks (``runner_report.py``)."""
        return runner_report.describe(self)

    def new_host_tokens(self) -> torch.Tensor:
        """A host buffer for one step's sampled tokens, a verify step's too (pinned where the platform pins)."""
        return torch.zeros((self.config.max_num_seqs + 1) * verify_step.rows_per_sequence(self.config),
                           dtype=torch.int64, pin_memory=self.platform.pin_memory)

    def device_bytes(self) -> int:
        """Bytes of weights, KV cache and token buffer this runner holds on its device (0 once closed); storage
        that tensors share (a LoRA pool stacked under its weight) counts once."""
        if self.model is None:
            return 0
        tensors = [*self.model.parameters(), *self.model.buffers(), self.token_buffer,
                   *vars(self.logits_state).values(), *(t for kv in self.kv_caches for t in kv)]
        held = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors if t.device == self.device}
        return sum(held.values())

    def close(self) -> None:
        """Release the executor's graphs, the KV cache, the model and the token buffer (idempotent; after a
        tensor-parallel peer failed, without waiting on the device); the runner cannot launch a step afterwards."""
        if self.model is None:
            return
        # a failed tensor-parallel group's queued collectives may never finish: nothing here may wait for them
        # (freeing device memory synchronises the device too); the memory goes back when the process ends
        healthy = liveness.failure() is None
        if healthy:
            self.platform.synchronize()  # no queued step still reads what is dropped here
        self.executor.close()
        if self.drafter is not None:
            self.drafter.close()
        self.grammars.close()
        self.executor = self.model = self.token_buffer = self.logits_state = self.logits_slots = None
        self.kv_caches = []
        if healthy:
            self.platform.release_memory()

    @property
    def expert_caches(self) -> list:
        """The device caches of the model's offloaded MoE layers (none unless ``offload_experts``)."""
        return expert_caches(self.model)

    # ---- execution ------------------------------------------------------------------------------------
    @torch.inference_mode()
    def launch(self, batch: ScheduledBatch, slot: StepSlot):
        """Queue the step (a verify step: ``verify_step.py``); its tokens land in the token buffer and, in the
        background, in ``slot.host_tokens``.  Returns (the platform event after its work, host seconds building
        decode inputs)."""
        filtered, processed, variant = self._begin(batch, slot)
        if batch.proposals is not None:
            return verify_step.launch(self, batch, slot), 0.0
        if processed:
            self.logits_slots.prepare(batch.seqs, batch.sampling(), slot.index)
        prepare_seconds = self._run(batch, slot, variant, filtered, processed)
        return self.platform.record_event(), prepare_seconds

    def splits(self, batch: ScheduledBatch) -> bool:
        """Whether ``batch`` can run in two halves (``launch_forward``, ``finish``): any step but a prefill that
        runs eagerly (images, prompt logprobs)."""
        return not batch.is_prefill or not (image_step.carries_images(batch) or prompt_logprob_rows(batch)[0])

    @torch.inference_mode()
    def launch_forward(self, batch: ScheduledBatch, slot: StepSlot):
        """Queue the first half of a processed step (the model, its logits kept in the logits state), for a batch
        that ``splits`` and whose grammar masks the host fills while it runs; ``finish`` queues the second.  A
        decode step runs the ``forward`` variant; a prefill the plain step, whose prefill graphs launch in one call
        where a compiled variant launches kernel by kernel (its unmasked tokens are overwritten by the second half).
        Returns (what ``finish`` takes: the step's inputs, which rows sample and whether any row filters, host
        seconds spent building decode inputs)."""
        filtered, processed, _ = self._begin(batch, slot)
        kept = []
        prepare_seconds = self._run(batch, slot, None if batch.is_prefill else "forward", filtered, processed, kept)
        return (kept, batch.sampling(), filtered), prepare_seconds

    @torch.inference_mode()
    def finish(self, batch: ScheduledBatch, slot: StepSlot, kept: tuple) -> object:
        """Fill the masks of ``batch`` (every earlier step resolved) and queue the second half of its step
        (``sample``, on the inputs of the first); returns the platform event recorded after the step's work.
        ``kept``: what ``launch_forward`` returned."""
        inputs, sampling, filtered = kept
        self.logits_slots.prepare(batch.seqs, sampling, slot.index)
        self.executor.run(prefill=batch.is_prefill, rows=len(batch.seqs), tokens=sum(batch.num_new_tokens),
                          variant="sample_logprobs" if slot.has_logprobs else "sample",
                          build=lambda part: inputs[part.index],
                          emit=lambda out, inp, part: self._emit(out, inp, part.rows, filtered, slot, part.start, True))
        return self.platform.record_event()

    def _begin(self, batch: ScheduledBatch, slot: StepSlot) -> tuple[bool, bool, str | None]:
        """(filtered, processed, variant) of a batch about to launch; sets up ``slot``'s logprobs."""
        if self.model is None:
            raise RuntimeError("this engine was closed (Engine.close()); build a new LLM to generate again")
        filtered = any(s.params.needs_filter for s in batch.seqs)
        processed = any(s.params.needs_processing for s in batch.seqs)
        slot.has_logprobs = any(s.logprobs is not None for s in batch.seqs)
        if slot.has_logprobs and slot.host_logprobs is None:
            rows, pin = self.config.max_num_seqs + 1, self.platform.pin_memory
            slot.host_logprobs = (torch.zeros(rows, 1 + MAX_LOGPROBS, pin_memory=pin),
                                  torch.zeros(rows, MAX_LOGPROBS, dtype=torch.int64, pin_memory=pin))
        return filtered, processed, variant_name(slot.has_logprobs, processed)

    def _run(self, batch: ScheduledBatch, slot: StepSlot, variant: str | None, filtered: bool, processed: bool,
             kept: list | None = None) -> float:
        """Launch ``variant`` of the step on ``batch``; with ``kept``, a split step's first half, whose inputs go to
        ``kept``, one per part (its tokens come from its second half; a later part may reuse a part's buffers, so
        those are copied).  Returns the seconds spent building decode inputs."""
        prepare_seconds = 0.0
        hybrid_state.copy_states(self, batch.restores)  # a hybrid model's prefix hits, then (below) its snapshots
        several = not batch.is_prefill and len(self.executor.decode_chunks(len(batch.seqs))) > 1
        pool = pooling.plan(batch) if batch.is_prefill else None

        def emit(outputs, inputs, part: Part) -> None:
            if pool is not None:  # before a later replay may overwrite the hidden states
                batch.pooled = pooling.launch(outputs[4], pool, self.platform.pin_memory)
            if kept is not None:
                if variant is None:  # the plain step's logits, kept as ``forward`` keeps its own
                    self.logits_state.keep(outputs[1], inputs.out_slots)
                kept.append(inputs.clone() if several else inputs)
            else:
                self._emit(outputs, inputs, part.rows, filtered, slot, part.start, processed)

        def build_decode(part: Part) -> StepInputs:
            nonlocal prepare_seconds
            t = time.perf_counter()
            inputs = self.decode_builder.build(batch.seqs[part.start:part.start + part.rows], part.shape[1],
                                               target=part.target, chunk=part.index, slot=slot.index)
            prepare_seconds += time.perf_counter() - t
            return inputs

        prompt = prompt_logprob_rows(batch) if batch.is_prefill else None
        images = batch.is_prefill and image_step.carries_images(batch)
        if images or (prompt is not None and prompt[0]):  # eagerly: image shapes vary, prompt rows need all of h
            inputs = self.prefill_builder.build(batch)
            mm = image_step.build(self.model, batch, inputs.input_ids.shape[0], self.device) if images else None
            if prompt[0]:
                outputs = self._launch_prompt_logprobs(inputs, mm, prompt, slot.has_logprobs, slot, processed)
            else:
                outputs = step_outputs(make_step(self.model, self.kv_caches, self.token_buffer, variant,
                                                 self.logits_state)(inputs, mm))
            emit(outputs, inputs, Part(0, 0, len(batch.seqs), None, None))
        elif batch.is_prefill:
            self.executor.run(prefill=True, rows=len(batch.seqs), tokens=sum(batch.num_new_tokens), variant=variant,
                              build=lambda part: self.prefill_builder.build(batch, part.shape, part.target),
                              emit=emit)
        else:
            self.executor.run(prefill=False, rows=len(batch.seqs), tokens=len(batch.seqs), variant=variant,
                              build=build_decode, emit=emit)
        hybrid_state.copy_states(self, batch.captures)
        return prepare_seconds

    def _launch_prompt_logprobs(self, inputs: StepInputs, mm, prompt: tuple, logprobs: bool, slot: StepSlot,
                                processed: bool) -> tuple:
        """Run a prefill that computes prompt logprobs (``prompt``: ``prompt_logprob_rows``) and copy them to
        ``slot.prompt_logprobs`` in the background; returns its outputs, as ``step_outputs`` gives them."""
        groups, token_rows, targets = prompt
        token_rows, targets = (torch.from_numpy(a).to(self.device, non_blocking=True) for a in (token_rows, targets))
        *outputs, (values, ids) = run_step_with_prompt_logprobs(
            self.model, self.kv_caches, self.token_buffer, inputs, token_rows, targets, logprobs, mm,
            self.logits_state if processed else None)
        pin = self.platform.pin_memory
        host = [torch.empty(t.shape, dtype=t.dtype, pin_memory=pin) for t in (values, ids)]
        for h, t in zip(host, (values, ids)):
            h.copy_(t, non_blocking=True)
        slot.prompt_logprobs = (groups, *host)
        return tuple(outputs)

    def _emit(self, outputs, inputs, rows: int, filtered: bool, slot: StepSlot, offset: int,
              processed: bool) -> None:
        """Copy live rows' tokens (and logprobs, if the step reports them) from the step's ``outputs``
        (``step_outputs``) to ``slot``'s host buffers in the background; batches with top-k/top-p re-draw the
        tokens first (a processed step's counts follow).  This runs before the next graph replays, whose outputs
        may share memory with these."""
        tokens, logits, logprobs, raw, _ = outputs
        if filtered:
            tokens = redraw_filtered(self.token_buffer, logits, inputs, rows, tokens,
                                     self.logits_state if processed else None)
        slot.host_tokens[offset:offset + rows].copy_(tokens[:rows], non_blocking=True)
        if logprobs is not None:
            values, ids = logprobs
            if filtered:
                values = rechoose_logprob(raw if raw is not None else logits, values, ids, tokens, rows)
            slot.host_logprobs[0][offset:offset + rows].copy_(values[:rows], non_blocking=True)
            slot.host_logprobs[1][offset:offset + rows].copy_(ids[:rows], non_blocking=True)

