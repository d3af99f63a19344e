"""The engine loop: schedule a step, run it on the model, feed the sampled tokens back to the scheduler."""
import time

import numpy as np

from nanovllm.config import EngineConfig
from nanovllm.engine.block_manager import BlockManager
from nanovllm.engine.model_runner import ModelRunner
from nanovllm.engine.scheduler import Scheduler
from nanovllm.engine.sequence import Sequence
from nanovllm.platforms import get_platform
from nanovllm.sampling_params import SamplingParams


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.platform = get_platform(config.device)
        self.runner = ModelRunner(config, self.platform)
        self.block_manager = BlockManager(self.runner.num_blocks, config.kvcache_block_size)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, config.max_num_batched_tokens,
                                   config.max_model_len, config.eos_token_ids)
        self._rng = np.random.default_rng(config.seed)
        self._next_id = 0
        self.stats = {"prefill_tokens": 0, "prefill_time": 0.0, "decode_tokens": 0, "decode_time": 0.0,
                      "decode_steps": 0, "schedule_time": 0.0, "decode_kv_tokens": 0}

    def add_request(self, prompt_token_ids: list[int], params: SamplingParams) -> Sequence:
        seed = params.seed % 2**63 if params.seed is not None else int(self._rng.integers(0, 2**31 - 1))
        seq = Sequence(self._next_id, prompt_token_ids, params, seed)
        self._next_id += 1
        self.scheduler.add(seq)
        return seq

    def step(self) -> tuple[list[Sequence], bool, int]:
        """Run one step; returns (finished sequences, was it a prefill, tokens computed)."""
        t0 = time.perf_counter()
        batch = self.scheduler.schedule()
        if not batch.seqs:
            return [], False, 0
        if not batch.is_prefill:  # KV tokens this decode step reads: the byte floor's dominant term
            self.stats["decode_kv_tokens"] += sum(len(s.token_ids) for s in batch.seqs)
        start = time.perf_counter()
        tokens = self.runner.run(batch)
        elapsed = time.perf_counter() - start
        t1 = time.perf_counter()
        finished = self.scheduler.postprocess(batch, tokens)
        self.stats["schedule_time"] += (start - t0) + (time.perf_counter() - t1)
        computed = sum(batch.num_new_tokens)
        kind = "prefill" if batch.is_prefill else "decode"
        self.stats[f"{kind}_tokens"] += computed
        self.stats[f"{kind}_time"] += elapsed
        if not batch.is_prefill:
            self.stats["decode_steps"] += 1
        return finished, batch.is_prefill, computed

    def has_work(self) -> bool:
        return self.scheduler.has_work()
