"""One request as it moves through the engine: its tokens, its KV blocks and how far its KV is computed."""
from enum import Enum, auto

from nanovllm.sampling_params import SamplingParams

# Stands in ``token_ids`` for a token that a launched step is still sampling on the device (the engine runs
# one step ahead of the host); the step's results replace it before anything reads its value on the host.
PENDING_TOKEN = -1


class SequenceStatus(Enum):
    WAITING = auto()
    RUNNING = auto()
    FINISHED = auto()


class Sequence:
    """Invariant: the KV of ``token_ids[:num_computed_tokens]`` is in the blocks of ``block_table``."""

    def __init__(self, seq_id: int, prompt_token_ids: list[int], params: SamplingParams, seed: int):
        self.seq_id = seq_id
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.params = params
        self.seed = seed
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at the last admission
        self.token_slot: int | None = None  # row of the device token buffer holding its newest sampled token
        self.finish_reason: str | None = None  # "stop" (EOS or a stop token), "length" or "abort", once finished
        # per resolved completion token, if ``params.logprobs`` is set: (its logprob, top ids, top logprobs)
        self.logprobs: list[tuple[float, list[int], list[float]]] | None = \
            [] if params.logprobs is not None else None

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_completion_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

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
    def is_prefilling(self) -> bool:
        """More than the last token still lacks KV, so its next step is a prefill chunk, not a decode."""
        return self.num_computed_tokens < len(self.token_ids) - 1
