"""``TextStream``: one completion's text as its tokens arrive, with stop strings.

* The text is that of ``tokenizer.decode(token_ids, skip_special_tokens, clean_up_tokenization_spaces=False)``
  (a tokenizer's clean-up of spaces, " ," -> ",", would rewrite text already returned), built incrementally: the
  concatenation of everything ``push`` and ``finish`` return equals ``text``, and, for a completion that no stop
  string cut, ``text`` equals that one-shot decode of the tokens pushed (``finish`` checks it and completes the
  text from it); ``skip`` counts a token without its text.  A character whose UTF-8 bytes span several tokens
  comes out whole, once its last token arrives.
* A stop string ends the text just before it (after it with ``include_stop``): ``stopped`` becomes True, ``text``
  is cut there and ``num_tokens`` is the number of tokens pushed up to the one that completed it (later ignored).
  While a stop string could still begin in the last ``len(longest stop) - 1`` characters, those are held back
  from ``push``'s return, so no returned text is ever taken back.  Before ``min_tokens`` tokens, none is looked for.

With a fast tokenizer, decoding uses the tokenizers library's ``DecodeStream``; otherwise it re-decodes the whole
completion per token (exact, but quadratic).
"""
try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # older tokenizers
    DecodeStream = None

REPLACEMENT = "\ufffd"  # what an incomplete UTF-8 sequence decodes to


def decode(tokenizer, token_ids, skip_special_tokens: bool = True) -> str:
    """A completion's text, decoded at once: what ``TextStream`` builds incrementally."""
    return tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens, clean_up_tokenization_spaces=False)


class TextStream:
    def __init__(self, tokenizer, stop: tuple[str, ...] = (), skip_special_tokens: bool = True,
                 include_stop: bool = False, min_tokens: int = 0):
        self.tokenizer = tokenizer
        self.min_tokens = min_tokens  # stop strings end the text only once it holds this many tokens
        self.stop = tuple(stop)
        self.skip_special_tokens, self.include_stop = skip_special_tokens, include_stop
        self._hold = max(map(len, self.stop), default=1) - 1
        backend = getattr(tokenizer, "backend_tokenizer", None)
        fast = DecodeStream is not None and backend is not None
        self._backend = backend if fast else None
        self._decoder = DecodeStream(skip_special_tokens=skip_special_tokens) if fast else None
        self.token_ids: list[int] = []
        self.text = ""
        self.num_tokens = 0  # tokens that count: all pushed, or those up to the stop string
        self.stopped = False
        self.stop_string: str | None = None  # the stop string that ended it
        self._sent = 0  # characters of ``text`` already returned

    def push(self, token_ids) -> str:
        """Add tokens; returns the text now safe to show."""
        for token in token_ids:
            if self.stopped:
                break
            self.token_ids.append(token)
            self.num_tokens += 1
            piece = self._decode_next(token)
            if piece:
                self._append(piece)
        return self._take(final=self.stopped)

    def skip(self, token_ids) -> None:
        """Count tokens whose text is not part of the completion (a stop token's, as OpenAI servers do)."""
        if not self.stopped:
            self.num_tokens += len(token_ids)

    def finish(self) -> str:
        """The completion ended: returns the rest of the text, held-back characters and an incomplete last
        character included."""
        if not self.stopped:
            full = self._decode_all()
            if full.startswith(self.text) and len(full) > len(self.text):
                self._append(full[len(self.text):])
        return self._take(final=True)

    def _decode_next(self, token: int) -> str:
        if self._decoder is not None:
            return self._decoder.step(self._backend, token) or ""
        full = self._decode_all()
        if full.endswith(REPLACEMENT) or not full.startswith(self.text):
            return ""
        return full[len(self.text):]

    def _decode_all(self) -> str:
        return decode(self.tokenizer, self.token_ids, self.skip_special_tokens)

    def _append(self, piece: str) -> None:
        start = max(0, len(self.text) - self._hold)
        self.text += piece
        if not self.stop or self.num_tokens < self.min_tokens:
            return
        hits = [(i, i + len(s), s) for i, s in ((self.text.find(s, start), s) for s in self.stop) if i >= 0]
        if hits:
            begin, end, self.stop_string = min(hits)  # the first stop string to start (the shortest there)
            self.text = self.text[:end if self.include_stop else begin]
            self.stopped = True

    def _take(self, final: bool) -> str:
        end = len(self.text) if final else max(self._sent, len(self.text) - self._hold)
        out = self.text[self._sent:end]
        self._sent = end
        return out
