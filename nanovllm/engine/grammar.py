"""Structured outputs on the host: a request's ``StructuredOutputsParams`` compiled by xgrammar into a matcher per
sequence, and the bitmask of the tokens each constrained row may take next.

``check(spec)`` parses the constraint without a tokenizer (milliseconds): a bad schema, regex or grammar raises
``ValueError`` naming the field, before the request is queued.  ``Grammars`` compiles against the checkpoint's
tokenizer on a thread pool as requests arrive (each distinct constraint once), so compiling overlaps the steps
before the request samples.  JSON is compiled without free whitespace (``", "`` and ``": "`` separators): a small
model cannot then loop on blank space.  A matcher advances only over resolved tokens; the engine resolves a
constrained sequence's tokens before it builds the sequence's next mask (``Engine.step``).
Bit ``i`` of word ``j`` of a row's int32 bitmask allows token ``32 * j + i`` (xgrammar's layout).
"""
import functools
import json
import os
import re
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

from nanovllm.sampling_params import StructuredOutputsParams


def _xgrammar():
    try:
        import xgrammar
    except ImportError as e:  # an install without it: say what to install
        raise ImportError("structured outputs need xgrammar: pip install xgrammar") from e
    return xgrammar


def _choice_ebnf(choices: list) -> str:
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _source(xgr, kind: str, text: str):
    """The tokenizer-free ``xgr.Grammar`` of a constraint's ``StructuredOutputsParams.key()``."""
    if kind == "json":
        return xgr.Grammar.from_json_schema(text, any_whitespace=False)
    if kind == "json_object":
        return xgr.Grammar.from_json_schema('{"type": "object"}', any_whitespace=False)
    if kind == "regex":
        return xgr.Grammar.from_regex(text)
    if kind == "choice":
        return xgr.Grammar.from_ebnf(_choice_ebnf(json.loads(text)))
    return xgr.Grammar.from_ebnf(text)


_BOUNDED = re.compile(r'(?<![\w"\\])(\w+)\{(\d+), (\d+)\} ("(?:[^"\\]|\\.)*")')  # rule{lo, hi} "literal"
FILL_ROWS = 64  # the fewest bitmask rows worth a thread of their own (``Grammars.fill``)
COMPILED_CACHE = 256  # compiled constraints kept by ``Grammars`` (xgrammar's compiler caches its own as well)
MAX_UNROLLED = 256  # a bounded repetition of at most this many optional items is unrolled (``unroll_bounded``)


def unroll_bounded(ebnf: str) -> str:
    """``ebnf`` with each bounded repetition of a rule followed by a literal, ``x{lo, hi} "t"`` (a JSON string's
    ``maxLength``: ``char{0, 32} "\""``; an array's ``maxItems``), spelled as ``x`` lo times then rules
    ``r_k ::= "t" | x r_(k-1)``, ``r_0 ::= "t"``: the same language.  xgrammar masks its own form slowly (the closing
    literal lies outside the repetition, so most tokens stay undecided until run time: xgrammar issue #852, up to
    milliseconds per mask); in this form the literal closes each rule and the masks are precomputed."""
    defined = set(re.findall(r"^(\w+) ::=", ebnf, re.M))
    chains: dict[tuple[str, str], list] = {}  # (rule, literal) -> [chain name, longest chain needed]

    def rewrite(match) -> str:
        name, lo, hi, end = match.group(1), int(match.group(2)), int(match.group(3)), match.group(4)
        if name not in defined or not 0 <= hi - lo <= MAX_UNROLLED:
            return match.group(0)
        chain = chains.setdefault((name, end), [next(c for c in (f"{name}_then{i}" for i in range(len(chains) + 2))
                                                     if f"{c}_0" not in defined), 0])
        chain[1] = max(chain[1], hi - lo)
        return " ".join([name] * lo + [f"{chain[0]}_{hi - lo}"])

    out = _BOUNDED.sub(rewrite, ebnf)
    rules = [f"{base}_{k} ::= {end}" + (f" | ({name} {base}_{k - 1})" if k else "")
             for (name, end), (base, longest) in chains.items() for k in range(longest + 1)]
    return out if not rules else out + "\n" + "\n".join(rules) + "\n"


def check(spec: StructuredOutputsParams) -> None:
    """Raise ``ValueError`` naming the field if xgrammar cannot parse ``spec`` (each distinct constraint is parsed
    once: requests repeat their schemas)."""
    kind, text = spec.key()
    message = _parse_error(kind, text)
    if message is not None:
        raise ValueError(f"structured_outputs.{kind} cannot be compiled: {message}")


@functools.lru_cache(maxsize=1024)
def _parse_error(kind: str, text: str) -> str | None:
    """xgrammar's message if it cannot parse the constraint, else None."""
    try:
        _source(_xgrammar(), kind, text)
    except RuntimeError as e:  # xgrammar's parse errors: "[time] file.cc:line: message"
        return str(e).strip().split(": ", 1)[-1] if ".cc:" in str(e) else str(e).strip()
    return None


class Grammars:
    """The engine's compiled grammars: ``start(seq)`` when a constrained request arrives, ``fill`` a step's
    bitmask rows, ``accept`` each resolved token.  ``seconds``: host time spent in ``fill`` and ``accept``
    (waiting for compiles included)."""

    def __init__(self, model_dir: str, vocab_size: int, stop_token_ids, threads: int = min(16, os.cpu_count() or 1),
                 fill_threads: int = min(4, max(1, (os.cpu_count() or 1) // 4))):
        """``threads`` compile grammars; ``fill_threads`` fill a step's masks, each at least ``FILL_ROWS`` rows
        (one xgrammar batch matcher of one thread each: xgrammar's own threads cost more than they saved)."""
        self.model_dir, self.vocab_size, self.stop_token_ids = model_dir, vocab_size, list(stop_token_ids)
        self.threads, self.fill_threads = threads, fill_threads
        self.words = -(-vocab_size // 32)  # int32 words of a bitmask row
        self._compiler = None
        self._pool: ThreadPoolExecutor | None = None
        self._fill_pool: ThreadPoolExecutor | None = None
        self._batches: list = []
        self._cache: OrderedDict[tuple[str, str], Future] = OrderedDict()  # the latest constraints' compiles
        self.seconds = 0.0

    def _ensure(self):
        if self._compiler is None:
            from transformers import AutoTokenizer
            xgr = _xgrammar()
            tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self.vocab_size,
                                                      stop_token_ids=self.stop_token_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=self.threads)
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="nanovllm-grammar")
            self._batches = [xgr.BatchGrammarMatcher(1) for _ in range(self.fill_threads)]
            if self.fill_threads > 1:
                self._fill_pool = ThreadPoolExecutor(self.fill_threads - 1, thread_name_prefix="nanovllm-mask")
        return self._compiler

    def _compiled(self, key: tuple[str, str]) -> Future:
        """A future of the ``xgr.CompiledGrammar`` of a constraint's ``StructuredOutputsParams.key()``: compiled on
        the pool the first time, then shared (requests repeat their schemas; parsing one again costs more than its
        matcher)."""
        future = self._cache.get(key)
        if future is not None:
            self._cache.move_to_end(key)
            return future
        compiler = self._ensure()
        xgr = _xgrammar()

        def build():
            kind, text = key
            if kind in ("json", "json_object"):
                return compiler.compile_grammar(unroll_bounded(str(_source(xgr, kind, text))))
            if kind == "regex":
                return compiler.compile_regex(text)
            return compiler.compile_grammar(_choice_ebnf(json.loads(text)) if kind == "choice" else text)

        future = self._cache[key] = self._pool.submit(build)
        if len(self._cache) > COMPILED_CACHE:
            self._cache.popitem(last=False)
        return future

    def start(self, spec: StructuredOutputsParams) -> "SequenceGrammar":
        """A sequence's grammar, compiling in the background."""
        return SequenceGrammar(self._compiled(spec.key()))

    def fill(self, grammars: list["SequenceGrammar"], bitmask) -> None:
        """Row ``i`` of ``bitmask`` [>= len(grammars), words] int32 (a host tensor) := the tokens ``grammars[i]``
        allows next; every token where it has ended (its row's token is thrown away: the sequence finished)."""
        start = time.perf_counter()
        matchers = [g.matcher() for g in grammars]
        ended = [m.is_terminated() for m in matchers]
        live = [i for i, e in enumerate(ended) if not e]
        if len(live) < len(matchers):
            bitmask[[i for i, e in enumerate(ended) if e]] = -1
        parts = max(1, min(self.fill_threads, len(live) // FILL_ROWS))
        chunks = [live[k::parts] for k in range(parts)]  # interleaved: neighbours cost alike
        futures = [self._fill_pool.submit(self._fill_rows, k, chunks[k], matchers, bitmask) for k in range(1, parts)]
        self._fill_rows(0, chunks[0], matchers, bitmask)
        for future in futures:
            future.result()
        self.seconds += time.perf_counter() - start

    def _fill_rows(self, k: int, rows: list[int], matchers: list, bitmask) -> None:
        if rows:
            self._batches[k].batch_fill_next_token_bitmask([matchers[i] for i in rows], bitmask, rows)

    def accept(self, resolved: list[tuple["SequenceGrammar", int]]) -> None:
        """Advance each grammar over its resolved token, in order."""
        start = time.perf_counter()
        for grammar, token in resolved:
            grammar.accept(token)
        self.seconds += time.perf_counter() - start

    def close(self) -> None:
        for pool in (self._pool, self._fill_pool):
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)


class SequenceGrammar:
    """One sequence's matcher: its grammar compiled in the background, then advanced over its resolved tokens."""

    def __init__(self, compiled: Future):
        self._compiled, self._matcher = compiled, None

    def matcher(self):
        """The matcher (made the first time, once the compile is done)."""
        if self._matcher is None:
            self._matcher = _xgrammar().GrammarMatcher(self._compiled.result())
        return self._matcher

    def accept(self, token: int) -> None:
        """Advance over a resolved token.  A token the mask allowed is always accepted; a stop token after the
        grammar ended is too."""
        matcher = self.matcher()
        if not matcher.is_terminated():
            matcher.accept_token(token)
