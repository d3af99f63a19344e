"""Per-request sampling settings, validated when they are made: ``SamplingParams`` and the structured-output
constraint it may carry (``StructuredOutputsParams``, vLLM's spelling)."""
import json as _json
import math
from dataclasses import dataclass, field

# Alternatives a step can report per sampled token (``logprobs``): a static size, so the tensor the runner reads
# them from has one shape for every batch.
MAX_LOGPROBS = 20
# Tokens a request may bias (``logit_bias``, plus its ``stop_token_ids`` while ``min_tokens`` holds them back): the
# width of the static per-request table a processed step reads them from (``nanovllm/step/logits_state.py``).
MAX_BIASED_TOKENS = 1024
LOGIT_BIAS_LIMIT = 100.0  # a bias is clamped to [-100, 100], as vLLM does


@dataclass
class StructuredOutputsParams:
    """A constraint on a completion's text, enforced token by token by a grammar (xgrammar): exactly one of

    ``json``: a JSON schema (a dict, or its JSON text) the text must validate against;
    ``json_object=True``: any JSON object;
    ``regex``: a regular expression the whole text must match;
    ``choice``: a list of strings, the text being one of them;
    ``grammar``: an EBNF grammar (xgrammar's dialect, GBNF-like, with a ``root`` rule).
    The grammar ends when the constraint is met: the model may then only emit its end-of-sequence token."""
    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list | None = None
    grammar: str | None = None

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Raise TypeError/ValueError naming the bad field."""
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if not isinstance(self.json_object, bool):
            raise TypeError(f"json_object must be a bool, got {type(self.json_object).__name__}")
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"structured_outputs needs exactly one of json, json_object, regex, choice, grammar; "
                             f"got {given or 'none'}")
        if self.json is not None and not isinstance(self.json, (dict, str)):
            raise TypeError(f"structured_outputs.json must be a JSON schema (dict or str), "
                            f"got {type(self.json).__name__}")
        if isinstance(self.json, str):
            try:
                _json.loads(self.json)
            except ValueError as e:
                raise ValueError(f"structured_outputs.json is not valid JSON: {e}") from None
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise TypeError(f"structured_outputs.{name} must be a non-empty str, got {value!r}")
        if self.choice is not None:
            if isinstance(self.choice, tuple):
                self.choice = list(self.choice)
            if not isinstance(self.choice, list) or not self.choice or \
                    not all(isinstance(c, str) and c for c in self.choice):
                raise TypeError(f"structured_outputs.choice must be a non-empty list of non-empty str, "
                                f"got {self.choice!r}")

    def key(self) -> tuple[str, str]:
        """(kind, text): what the grammar is compiled from, a hashable cache key."""
        if self.json is not None:
            text = self.json if isinstance(self.json, str) else _json.dumps(self.json)  # property order matters
            return "json", text
        if self.json_object:
            return "json_object", ""
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", _json.dumps(self.choice)
        return "grammar", self.grammar


@dataclass
class SamplingParams:
    """How one request picks its tokens.

    ``temperature=0`` is greedy.  ``top_k=-1`` and ``top_p=1.0`` switch those filters off.
    A request with a ``seed`` draws the same tokens whatever else shares its batch.
    ``stop``: strings that end the completion when its text contains one; the text returned stops before it.
    ``logprobs=k`` (0 to ``MAX_LOGPROBS``): report, for every generated token, its log-probability and the ``k``
    most likely tokens' (from the model's raw distribution, before temperature or filters).
    ``prompt_logprobs=k`` (0 to ``MAX_LOGPROBS``): report, for every prompt token after the first, its
    log-probability given the tokens before it and the ``k`` most likely tokens' there (raw distribution too).  Such
    a request computes its whole prompt: it takes no prefix-cache hit.
    Penalties, with vLLM's semantics, change the logits before temperature: ``repetition_penalty`` (> 0, 1 is off)
    divides a positive logit and multiplies a negative one of every token in the prompt or the completion so far;
    ``frequency_penalty`` (in [-2, 2]) subtracts itself times a token's count in the completion so far, and
    ``presence_penalty`` (in [-2, 2]) subtracts itself from every token the completion holds.
    ``structured_outputs``: a ``StructuredOutputsParams`` the completion's text is constrained to.
    vLLM's semantics too: ``min_p`` (in [0, 1], 0 is off) keeps, after temperature, the tokens whose probability
    is at least ``min_p`` times the most likely one's; ``min_tokens``: until the completion holds that many tokens,
    EOS and ``stop_token_ids`` cannot be sampled and stop strings do not end it; ``logit_bias`` ({token id: bias},
    each bias clamped to [-100, 100]) is added to the logits before penalties.
    Text only, no effect on sampling (``nanovllm/detokenizer.py``): ``skip_special_tokens`` (default True) leaves
    special tokens' text out of the text; ``include_stop_str_in_output`` (default False) keeps the stop string that
    ended the text, or the stop token's text, at its end.
    """
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    max_tokens: int = 64
    ignore_eos: bool = False
    stop_token_ids: tuple = field(default_factory=tuple)
    seed: int | None = None
    stop: tuple = field(default_factory=tuple)
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    structured_outputs: StructuredOutputsParams | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    min_p: float = 0.0
    min_tokens: int = 0
    logit_bias: dict[int, float] | None = None
    n: int = 1  # completions per prompt (``LLM.generate``: choice i with ``seed + i`` where a seed is given)

    def __post_init__(self):
        self.stop_token_ids = tuple(self.stop_token_ids)
        self.validate()

    def validate(self) -> None:
        """Raise TypeError/ValueError naming the bad field and what is allowed."""
        def is_int(x):
            return isinstance(x, int) and not isinstance(x, bool)

        def is_num(x):
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        for name in ("temperature", "top_p", "min_p"):
            value = getattr(self, name)
            if is_num(value) and not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")

        if not is_num(self.temperature):
            raise TypeError(f"temperature must be a number, got {type(self.temperature).__name__}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not is_int(self.top_k):
            raise TypeError(f"top_k must be an int, got {type(self.top_k).__name__}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if not is_num(self.top_p):
            raise TypeError(f"top_p must be a number, got {type(self.top_p).__name__}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not is_num(self.min_p):
            raise TypeError(f"min_p must be a number, got {type(self.min_p).__name__}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0 is off), got {self.min_p}")
        if not is_int(self.min_tokens):
            raise TypeError(f"min_tokens must be an int, got {type(self.min_tokens).__name__}")
        if self.min_tokens < 0:
            raise ValueError(f"min_tokens must be >= 0, got {self.min_tokens}")
        self._validate_logit_bias(is_int, is_num)
        if not is_int(self.max_tokens):
            raise TypeError(f"max_tokens must be an int, got {type(self.max_tokens).__name__}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        if not is_int(self.n) or self.n < 1:
            raise ValueError(f"n must be an int >= 1, got {self.n!r}")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {type(getattr(self, name)).__name__}")
        if not all(is_int(t) for t in self.stop_token_ids):
            raise TypeError(f"stop_token_ids must be ints, got {self.stop_token_ids!r}")
        if self.seed is not None and not is_int(self.seed):
            raise TypeError(f"seed must be an int or None, got {type(self.seed).__name__}")
        if isinstance(self.stop, (str, list)):  # here, not only at construction: ``stop`` may be set later
            self.stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not isinstance(self.stop, tuple) or not all(isinstance(s, str) for s in self.stop):
            raise TypeError(f"stop must be a str or a list of str, got {self.stop!r}")
        if any(not s for s in self.stop):
            raise ValueError(f"stop strings must not be empty, got {self.stop!r}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is None:
                continue
            if not is_int(value):
                raise TypeError(f"{name} must be an int or None, got {type(value).__name__} {value!r}")
            if not 0 <= value <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")

        for name in ("presence_penalty", "frequency_penalty", "repetition_penalty"):
            value = getattr(self, name)
            if not is_num(value):
                raise TypeError(f"{name} must be a number, got {type(value).__name__}")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 is off), got {self.repetition_penalty}")
        if self.structured_outputs is not None:
            if not isinstance(self.structured_outputs, StructuredOutputsParams):
                raise TypeError(f"structured_outputs must be a StructuredOutputsParams, "
                                f"got {type(self.structured_outputs).__name__}")
            self.structured_outputs.validate()

    def _validate_logit_bias(self, is_int, is_num) -> None:
        bias = self.logit_bias
        if bias is None:
            return
        if not isinstance(bias, dict):
            raise TypeError(f"logit_bias must be a dict of token id -> bias, got {type(bias).__name__}")
        for token, value in bias.items():
            if not is_int(token):
                raise TypeError(f"logit_bias keys must be int token ids, got {token!r}")
            if token < 0:
                raise ValueError(f"logit_bias token id {token} is negative")
            if not is_num(value) or not math.isfinite(value):
                raise ValueError(f"logit_bias[{token}] must be a finite number, got {value!r}")
        banned = len(set(self.stop_token_ids)) if self.min_tokens > 0 else 0
        if len(bias) + banned > MAX_BIASED_TOKENS:
            raise ValueError(f"logit_bias holds {len(bias)} tokens" + (f" and min_tokens holds back {banned} "
                             f"stop_token_ids" if banned else "") + f": at most {MAX_BIASED_TOKENS} in all")

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ValueError naming the first ``logit_bias`` token id outside a vocabulary of ``vocab_size``."""
        for token in self.logit_bias or ():
            if token >= vocab_size:
                raise ValueError(f"logit_bias token id {token} is outside the vocabulary (size {vocab_size})")

    @property
    def has_penalties(self) -> bool:
        """True when a penalty changes the logits."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def needs_processing(self) -> bool:
        """True when the step must change this request's logits before sampling (penalties, a grammar, a logit
        bias, a minimum length)."""
        return self.has_penalties or self.structured_outputs is not None or bool(self.logit_bias) or \
            self.min_tokens > 0

    @property
    def needs_filter(self) -> bool:
        """True when top-k, top-p or min-p actually restricts the candidates (and sampling is not greedy)."""
        return self.temperature > 0 and (self.top_k != -1 or self.top_p < 1.0 or self.min_p > 0)
