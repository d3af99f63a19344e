"""``Drafter``: the draft-model proposer of speculative decoding (``speculative_config`` method ``draft_model``).

A small model with the target's tokenizer proposes each sequence's next tokens by drawing them itself, with the
sampler's noise of each position (seed and position, as the target draws them), so where the two models agree
the verify step keeps its drafts.  Its KV cache has as many blocks as the target's and is indexed by the same
block tables (the target's block manager hands out blocks for both; ``kv_cache.plan_num_blocks`` sizes the two
caches in one budget); it has its own token buffer and its own executor, whose decode graphs it replays.

One proposal of up to k tokens: a catch-up step computes the draft's KV of the tokens it has not seen (a new
prompt whole, later the tokens kept since; one row per token, as the verify step's rows, ``verify_step.py``) and
draws the first draft from each sequence's last row; then up to k - 1 decode steps draw one more each, reading
their input token from the draft's token buffer.  The host waits once, for all the drafts.  The draft's KV of a
sequence stays valid while its block table is the same list (a preempted sequence starts over) and up to the
first draft the sequence did not keep.
"""
import dataclasses
import functools
import json
import os
from typing import NamedTuple

import numpy as np
import torch

from nanovllm.compile.cache import key_fields
from nanovllm.compile.base import ExecutorSpec
from nanovllm.compile.factory import make_executor
from nanovllm.config import EngineConfig
from nanovllm.engine.decode_inputs import DecodeInputBuilder
from nanovllm.engine.kv_cache import KVCacheSpec
from nanovllm.engine.verify_step import build_part, concatenate, sequence_rows
from nanovllm.models.loader import build_model
from nanovllm.step import make_step


def draft_config(config: EngineConfig) -> EngineConfig:
    """The draft model's engine settings: the target's, with the draft's checkpoint, unquantized unless its
    checkpoint is, its KV cache in the model's dtype and no prefill graphs.  Raises if its vocabulary or
    tokenizer differs from the target's, or its context is shorter than ``max_model_len``."""
    path = config.speculative.model
    draft = dataclasses.replace(config, model=path, speculative_config=None, quantization=None,
                                kv_cache_dtype="auto", kv_cache_scales="auto", offload_experts=False,
                                experts_on_device=None, offload_host_share=None, num_kvcache_blocks=None,
                                prefill_graph_sizes=[], graph_batch_sizes=None)
    draft.graph_batch_sizes = config.graph_batch_sizes  # the target's buckets: a catch-up step has many rows
    if draft.max_model_len < config.max_model_len:
        raise ValueError(f"the draft model {path!r} holds {draft.max_model_len} positions, fewer than "
                         f"max_model_len={config.max_model_len}; lower max_model_len")
    sizes = [_text(c).get("vocab_size") for c in (config.hf_config, draft.hf_config)]
    if sizes[0] != sizes[1]:
        raise ValueError(f"the draft model {path!r} has vocab_size {sizes[1]}, the model {config.model!r} "
                         f"{sizes[0]}: a draft must share the model's tokenizer")
    vocabs = [_tokenizer_vocab(d) for d in (config.model, path)]
    if None not in vocabs and vocabs[0] != vocabs[1]:
        raise ValueError(f"the draft model {path!r} has another tokenizer than {config.model!r} "
                         f"(their tokenizer.json vocabularies differ)")
    return draft


def _text(hf_config: dict) -> dict:
    return hf_config.get("text_config") or hf_config


def _tokenizer_vocab(model_dir: str):
    path = os.path.join(model_dir, "tokenizer.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        t = json.load(f)
    return (t.get("model") or {}).get("vocab"), [(a.get("id"), a.get("content")) for a in t.get("added_tokens", [])]


class _Seen(NamedTuple):
    """What the draft's cache holds of a sequence: computed under ``table`` (its block-table list), the KV of its
    first ``length`` tokens and of ``drafts``, the tokens it proposed after them (all but its last)."""
    table: list
    length: int
    drafts: list


class Drafter:
    @classmethod
    def make(cls, config: EngineConfig, platform, dtype: torch.dtype) -> "Drafter | None":
        """The draft model of a ``draft_model`` speculative config, else None."""
        method = config.speculative.method if config.speculative is not None else None
        return cls(config, platform, dtype) if method == "draft_model" else None

    def __init__(self, config: EngineConfig, platform, dtype: torch.dtype):
        """Load the draft model (before the target's KV cache is sized: its weights count); ``start`` makes the
        rest once the number of blocks is known."""
        self.config, self.platform, self.device = draft_config(config), platform, platform.device
        self.num_speculative_tokens = config.speculative.num_speculative_tokens
        cfg = self.config
        self.model = build_model(cfg.hf_config, dtype=dtype, device=self.device, model_dir=cfg.model,
                                 load_format=cfg.load_format, seed=cfg.seed, scheme=cfg.quant_scheme)
        self.kv_spec = KVCacheSpec.of_model(self.model, cfg.kvcache_block_size, dtype)
        if any(state is not None for state in self.kv_spec.states):
            raise ValueError(f"the draft model {cfg.model!r} is a hybrid linear-attention model "
                             f"({type(self.model).__name__}); a draft model must keep its context in KV blocks")
        self.dtype, self.kv_caches, self.executor = dtype, [], None
        self._seen: dict[int, _Seen] = {}

    def start(self, num_blocks: int, dummy_prefill) -> None:
        """Allocate the draft's KV cache (``num_blocks``, the target's count), token buffer and executor
        (graph mode: compiled and captured); ``dummy_prefill``: the target's all-padding prefill builder."""
        cfg, platform = self.config, self.platform
        self.kv_caches = self.kv_spec.allocate(num_blocks, self.device)
        self.token_buffer = torch.zeros(cfg.max_num_seqs + 1, dtype=torch.int64, device=self.device)
        self.builder = DecodeInputBuilder(device=self.device, pin_memory=platform.pin_memory,
                                          block_size=cfg.kvcache_block_size, scratch_slot=cfg.max_num_seqs,
                                          table_width=-(-cfg.max_model_len // cfg.kvcache_block_size))
        self.host = torch.zeros((self.num_speculative_tokens, cfg.max_num_seqs + 1), dtype=torch.int64,
                                pin_memory=platform.pin_memory)
        spec = ExecutorSpec(
            step=make_step(self.model, self.kv_caches, self.token_buffer), variants={}, platform=platform,
            graph_batch_sizes=cfg.graph_batch_sizes, prefill_graph_sizes=(), max_num_seqs=cfg.max_num_seqs,
            max_step_tokens=cfg.max_step_tokens, dummy_prefill=dummy_prefill,
            decode_inputs=functools.partial(self.builder.build, []),
            cache_key=key_fields(cfg, dtype=self.dtype, kv_dtype=self.dtype, num_kv_blocks=num_blocks,
                                 platform=platform))
        self.executor = make_executor(spec, enforce_eager=cfg.enforce_eager, capturable=self.model.graph_capturable,
                                      not_capturable_reason=self.model.not_capturable_reason)

    def describe(self) -> dict:
        return {"model": self.config.model, "mode": self.executor.mode if self.executor else None,
                "weight_bytes": sum(t.numel() * t.element_size() for t in self.model.parameters()),
                "kv_bytes_per_token": self.kv_spec.bytes_per_token}

    def close(self) -> None:
        if self.executor is not None:
            self.executor.close()
        self.executor = self.model = self.token_buffer = None
        self.kv_caches = []

    def _valid(self, seq) -> int:
        """How many of ``seq``'s tokens the draft's cache holds the KV of (at most all but its newest)."""
        seen = self._seen.get(seq.seq_id)
        if seen is None or seen.table is not seq.block_table:
            return 0
        valid = seen.length
        for draft, token in zip(seen.drafts, seq.token_ids[seen.length:]):
            if draft != token:
                break
            valid += 1
        return min(valid, len(seq) - 1)

    @torch.inference_mode()
    def propose_all(self, seqs: list, limits: list[int]) -> list[list[int]]:
        """Per sequence, the draft's next ``limit`` tokens (every token of each resolved, blocks appended)."""
        size, width = self.builder.block_size, self.builder.width
        live = [i for i, limit in enumerate(limits) if limit > 0]
        rows = []
        for i in live:  # catch-up: the unseen tokens, the last row drawing the first draft into slot i
            seq = seqs[i]
            start = self._valid(seq)
            r = sequence_rows(seq, start, seq.token_ids[start:], size, width)
            r["out_slots"] = np.full(len(seq) - start, self.builder.scratch_slot)
            r["out_slots"][-1] = i
            rows.append(r)
        self._run(concatenate(rows), 0)
        for step in range(1, max(limits)):  # each draft from the one before it, in the token buffer
            rows = []
            for i in (i for i in live if limits[i] > step):
                seq = seqs[i]
                r = sequence_rows(seq, len(seq) - 1 + step, [0], size, width)
                r["token_slots"] = r["out_slots"] = np.full(1, i)
                rows.append(r)
            self._run(concatenate(rows), step)
        self.platform.synchronize()
        drafts = self.host[:max(limits), :len(seqs)].T.tolist()
        if len(self._seen) > 4 * max(len(seqs), 64):  # forget finished sequences now and then
            self._seen = {s.seq_id: self._seen[s.seq_id] for s in seqs if s.seq_id in self._seen}
        for i in live:
            seq = seqs[i]
            self._seen[seq.seq_id] = _Seen(seq.block_table, len(seq), drafts[i][:limits[i] - 1])
        return [drafts[i][:limit] for i, limit in enumerate(limits)]

    def _run(self, rows: dict, step: int) -> None:
        """Queue one draft step of ``rows``; its drawn tokens (the token buffer) reach ``host[step]`` later."""
        total = len(rows["input_ids"])
        self.executor.run(prefill=False, rows=total, tokens=total, emit=lambda *args: None,
                          build=lambda part: build_part(self.builder, rows, part, ("draft", step)))
        self.host[step].copy_(self.token_buffer, non_blocking=True)
