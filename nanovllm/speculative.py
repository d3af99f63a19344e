"""Speculative decoding: ``SpeculativeConfig`` (the ``speculative_config`` option, vLLM's keys), the n-gram
proposer and the acceptance rule (the draft-model proposer runs a model: ``engine/drafter.py``).

``propose(tokens, ...)`` finds the longest suffix of the sequence (``prompt_lookup_max`` down to
``prompt_lookup_min`` tokens) that occurred earlier in it, most recent occurrence first, and proposes the tokens
that followed it.  A verify step computes the sequence's newest token and the proposal in one pass and draws a
token at every position with the sampler's own noise (keyed by seed and position, as a plain decode step draws
it).  ``accept`` keeps the proposed tokens up to the first that differs from the drawn one, then the drawn token
there: the tokens plain decoding draws from the same logits, greedy or seeded (rejection sampling keeps only the
distribution).  Outputs stay the same where the logits do not depend on a step's row count (docs/SPECULATIVE.md).
"""
import json
import os
from dataclasses import dataclass

import numpy as np

METHODS = ("ngram", "draft_model")
_KEYS = {"ngram": {"prompt_lookup_min", "prompt_lookup_max"}, "draft_model": {"model"}}


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    model: str | None = None  # the draft model's checkpoint directory (``draft_model``)

    @classmethod
    def parse(cls, value) -> "SpeculativeConfig | None":
        """From ``LLM(speculative_config=...)``: a dict, its JSON text (the command line's), or None (off)."""
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config must be a JSON object, got {value!r}: {e}") from None
        if not isinstance(value, dict):
            raise TypeError(f"speculative_config must be a dict, got {type(value).__name__}")
        method = value.get("method")
        if method not in METHODS:
            raise ValueError(f"speculative_config method must be one of {list(METHODS)}, got {method!r}")
        known = {"method", "num_speculative_tokens", *_KEYS[method]}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"speculative_config has unknown keys {unknown} for method {method!r}; "
                             f"known: {sorted(known)}")
        out = cls(method, value.get("num_speculative_tokens"), value.get("prompt_lookup_min", 1),
                  value.get("prompt_lookup_max", 4), value.get("model"))
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            v = getattr(out, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"speculative_config {name} must be an int >= 1, got {v!r}")
        if out.prompt_lookup_max < out.prompt_lookup_min:
            raise ValueError(f"speculative_config prompt_lookup_max={out.prompt_lookup_max} is below "
                             f"prompt_lookup_min={out.prompt_lookup_min}")
        if method == "draft_model" and not (isinstance(out.model, str) and os.path.isdir(out.model)):
            raise ValueError(f"speculative_config model must be the draft model's checkpoint directory, "
                             f"got {out.model!r}")
        return out

    def propose_all(self, seqs: list, limits: list[int]) -> list[list[int]]:
        """Per sequence (anything with ``token_ids``), its n-gram proposal of at most its limit."""
        return [self.propose(seq.token_ids, limit) for seq, limit in zip(seqs, limits)]

    def propose(self, tokens: list[int], limit: int) -> list[int]:
        """At most ``min(num_speculative_tokens, limit)`` tokens that followed the latest earlier occurrence of the
        longest suffix of ``tokens`` (``prompt_lookup_min`` to ``prompt_lookup_max`` long); none if no match.
        Vectorised: the host runs this for every sequence of every decode step."""
        k = min(self.num_speculative_tokens, limit)
        n_tokens = len(tokens)
        if k <= 0 or n_tokens < self.prompt_lookup_min + 1:
            return []
        arr = np.asarray(tokens, dtype=np.int64)
        # starts where the first suffix token occurs, the suffix itself excluded; longer suffixes narrow them
        for n in range(min(self.prompt_lookup_max, n_tokens - 1), self.prompt_lookup_min - 1, -1):
            suffix = arr[n_tokens - n:]
            starts = np.flatnonzero(arr[:n_tokens - n] == suffix[0])
            for offset in range(1, n):
                starts = starts[arr[starts + offset] == suffix[offset]]
            if starts.size:
                start = int(starts[-1]) + n
                return tokens[start:start + k]
        return []


def accept(proposal: list[int], drawn: list[int]) -> list[int]:
    """The tokens a verify step adds: ``proposal`` up to its first token that differs from ``drawn`` (the tokens
    drawn at each of its positions, one more than the proposal), then the drawn token at that position."""
    assert len(drawn) == len(proposal) + 1
    a = 0
    while a < len(proposal) and proposal[a] == drawn[a]:
        a += 1
    return drawn[:a + 1]
