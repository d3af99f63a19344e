"""One request as it moves through the engine: its tokens, its KV blocks and how far its KV is computed.

A prompt with images (vision-language models) also carries ``ImageInputs``: the images' pixels, where their
tokens are in the prompt, a hash of each image (the prefix cache keys blocks by it, so equal placeholder tokens
in front of different images never share KV) and the prompt's M-RoPE positions (``nanovllm/models/mrope.py``).

A request with ``prompt_logprobs`` computes them while its prompt is prefilled for the first time
(``wants_prompt_logprobs``): ``prompt_logprobs`` collects one entry per prompt position, ``None`` for the first.
A pooling request (``pooling``: its resolved ``PoolingParams``) prefills every prompt token, samples nothing and
ends when its last chunk launches; ``embedding`` holds its vector once that step resolves (``pooling.py``).
"""
from dataclasses import dataclass, field
from enum import Enum, auto

import numpy as np

from nanovllm.pooling_params import PoolingParams
from nanovllm.sampling_params import SamplingParams

# Stands in ``token_ids`` for a token that a launched step is still sampling on the device (the engine runs
# one step ahead of the host); the step's results replace it before anything reads its value on the host.
PENDING_TOKEN = -1


@dataclass
class ImageInputs:
    pixel_values: object          # [patches, C * temporal_patch * patch * patch] float32 host tensor, all images
    grid_thw: list                # per image: (t, h, w) patches before the merge
    spans: list                   # per image: (first token, number of tokens) in the prompt
    hashes: list                  # per image: content hash (int < 2**63)
    positions3: np.ndarray        # [3, prompt tokens] int64 M-RoPE positions
    rope_delta: int               # position minus token index past the prompt's last image (<= 0)
    encoded: object = field(default=None, repr=False)  # the tower's output while the prompt is prefilled

    def keys_between(self, start: int, end: int) -> tuple:
        """Hashes of the images with tokens in [start, end): what a KV block over those tokens depends on besides
        its token ids."""
        return tuple(h for (first, n), h in zip(self.spans, self.hashes) if first < end and first + n > start)

    @property
    def end(self) -> int:
        """One past the prompt's last image token."""
        return max(first + n for first, n in self.spans)


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """Invariant: the KV of ``token_ids[:num_computed_tokens]`` is in the blocks of ``block_table``."""

    def __init__(self, seq_id: int, prompt_token_ids: list[int], params: SamplingParams, seed: int,
                 images: ImageInputs | None = None, pooling: PoolingParams | None = None):
        self.seq_id = seq_id
        self.pooling = pooling
        self.pool_sum = None  # MEAN pooling: the float32 sum of its computed tokens' hidden states, on the device
        self.embedding = None  # a pooling request's vector (numpy float32), once its last step resolved
        self.images = images
        self.rope_delta = images.rope_delta if images is not None else 0
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.seed = seed
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.window_table: list[int] = []  # sliding-window layers' blocks, where they have a pool (window_blocks.py)
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at the last admission
        self.num_preemptions = 0  # times it was sent back to the queue
        self.token_slot: int | None = None  # row of the device token buffer holding its newest sampled token
        self.lora = None  # its ``LoRARequest`` (None: the base model)
        self.lora_slot = 0  # its adapter's slot in the device pool while running (kernels/lora; 0: none)
        self.lora_passed_by = 0  # requests admitted before it while it waited for a slot (the scheduler's bound)
        self.state_restore: int | None = None  # hybrid models: the snapshot its first chunk starts from
        self.capture_points: list = []  # hybrid models: (tokens, block hash) where its state is snapshotted
        self.lead_depth = 0  # blocks it computes for waiting prompts that share them (``shared_prefix.py``)
        self.block_chain: tuple | None = None  # ((length, last token), its full blocks' chain hashes), block_manager
        self.num_reported_tokens = 0  # completion tokens the engine's step outputs carried so far
        self.finish_reason: str | None = None  # "stop" (EOS or a stop token), "length" or "abort", once finished
        # per resolved completion token, if ``params.logprobs`` is set: (its logprob, top ids, top logprobs)
        self.logprobs: list[tuple[float, list[int], list[float]]] | None = \
            [] if params.logprobs is not None else None
        # per prompt position, if ``params.prompt_logprobs`` is set: None for position 0, then (the prompt token,
        # its logprob, top ids, top logprobs), appended as the prefill steps that computed them resolve
        self.prompt_logprobs: list | None = [None] if params.prompt_logprobs is not None else None
        self.num_reported_prompt_logprobs = 0  # entries of ``prompt_logprobs`` the step outputs carried so far
        self.grammar = None  # a ``grammar.SequenceGrammar`` if ``params.structured_outputs`` is set (the engine's)

    def block_key(self, start: int, end: int) -> tuple:
        """The identity of the KV of tokens [start, end): their ids, minus its LoRA adapter's id if it has one, then
        the hashes of images among them."""
        tokens = tuple(self.token_ids[start:end])
        if self.lora is not None:  # an adapter's KV is its own: never shared with the base or another adapter
            tokens += (-self.lora.lora_int_id,)
        return tokens + self.images.keys_between(start, end) if self.images is not None else tokens

    def rope_positions(self, start: int, n: int) -> np.ndarray:
        """1-D rope positions of tokens [start, start + n): their indices, shifted as M-RoPE shifts text (an image
        token's entry is its temporal component; a step with image tokens uses ``images.positions3``)."""
        pos = np.arange(start, start + n)
        if self.images is None:
            return pos
        prompt = self.images.positions3[0]
        return np.where(pos < len(prompt), prompt[np.minimum(pos, len(prompt) - 1)], pos + self.rope_delta)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def completion_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_resolved_tokens(self) -> int:
        """Tokens whose values are known on the host: all but the trailing ``PENDING_TOKEN``s."""
        n, tokens = len(self.token_ids), self.token_ids
        while n > self.num_prompt_tokens and tokens[n - 1] == PENDING_TOKEN:
            n -= 1
        return n

    @property
    def wants_prompt_logprobs(self) -> bool:
        """It asked for prompt logprobs and its prompt has not been prefilled yet: nothing was sampled, so the
        prompt is not a readmission after preemption (whose prompt logprobs were computed the first time)."""
        return self.prompt_logprobs is not None and len(self.token_ids) == self.num_prompt_tokens

    @property
    def skips_cache_hits(self) -> bool:
        """A prefix-cache hit would skip tokens it needs: prompt logprobs it still computes, or MEAN pooling's."""
        return self.wants_prompt_logprobs or (self.pooling is not None and self.pooling.pooling_type == "MEAN")

    def prompt_logprob_span(self, n: int) -> tuple[int, int]:
        """(first prompt position, count) whose logprobs a prefill chunk of ``n`` tokens from
        ``num_computed_tokens`` yields: row i of the chunk predicts position ``start + i + 1``, a prompt logprob up
        to the prompt's last token (the last row predicts the first completion token).  (0, 0) when none."""
        if not self.wants_prompt_logprobs:
            return 0, 0
        start = self.num_computed_tokens
        return start + 1, max(0, min(start + n, self.num_prompt_tokens - 1) - start)

    @property
    def is_prefilling(self) -> bool:
        """More than the last token still lacks KV (any token, for a pooling request), so its next step is a prefill
        chunk, not a decode."""
        return self.num_computed_tokens < len(self.token_ids) - (self.pooling is None)
