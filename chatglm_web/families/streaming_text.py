"""Incremental detokenization for streaming, for any tokenizer with ``decode(ids, skip_special_tokens=...)``.

    decoder = IncrementalDecoder(tokenizer)          # ChatGLM3Tokenizer or a Hugging Face tokenizer
    for token_id in generated:
        show(decoder.push(token_id))                 # new text, possibly ""
    show(decoder.finish())                           # whatever was held back

Guarantee: ``"".join(deltas) + finish() == tokenizer.decode(all_ids, skip_special_tokens=...)``
for tokenizers whose decode is append-only apart from an incomplete trailing UTF-8 sequence
(sentencepiece, ChatGLM3Tokenizer, HF byte-level and Metaspace tokenizers). Not exact for HF
tokenizers that clean up spaces (``clean_up_tokenization_spaces=True``) or whose byte-fallback
rewrites already complete characters when invalid bytes follow them.

Technique (as in vLLM/TGI): only a short window ``ids[start:]`` is decoded per token, so the cost per
token does not grow with the reply. ``emitted`` counts the characters of the window text already
returned. Text ending in U+FFFD (an incomplete UTF-8 sequence) is held back from that point on.
The window moves forward only when its text ends cleanly and the new start renders to a
non-empty suffix of it: this keeps tokenizers that drop the leading space of the first decoded
piece (sentencepiece's dummy prefix) exact, because that space was already emitted.
Pathological streams (long runs of undecodable bytes or of skipped special ids) only widen
the window until the text ends cleanly again; they never lose text.
"""

from __future__ import annotations

_REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """Turns a stream of token ids into text deltas."""

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._start = 0      # the window is ids[_start:]
        self._next_start = 0  # first id after the last clean point: the next window start
        self._emitted = 0     # characters of the window text already returned

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one id; return the text it made visible (may be "")."""
        self.ids.append(int(token_id))
        text = self._decode(self.ids[self._start:])
        stable = len(text.rstrip(_REPLACEMENT))
        delta = text[self._emitted:stable]
        self._emitted = max(self._emitted, stable)
        if delta and stable == len(text):  # grew and ends cleanly: try to move the window
            candidate = self._decode(self.ids[self._next_start:])
            if candidate and text.endswith(candidate):
                self._start, self._emitted = self._next_start, len(candidate)
            self._next_start = len(self.ids)
        return delta

    def finish(self) -> str:
        """Flush text held back (e.g. an incomplete UTF-8 sequence at the very end)."""
        text = self._decode(self.ids[self._start:])
        delta = text[self._emitted:]
        self._emitted = max(self._emitted, len(text))
        return delta


class StopStrings:
    """Cuts streamed text at the first of a few stop strings, across piece boundaries.

        stops = StopStrings(["\\nUser:"])
        show(stops.feed(piece))   # text before any stop string; a possible start of one is held back
        stops.hit                 # True once a stop string was seen: end the reply there
        show(stops.finish())      # the held-back text when the reply ends without a stop string
    """

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.hit = False
        self._held = ""

    def feed(self, text: str) -> str:
        if self.hit or not self.stops:
            return "" if self.hit else text
        text = self._held + text
        found = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit, self._held = True, ""
            return text[:min(found)]
        keep = max((k for s in self.stops for k in range(min(len(s) - 1, len(text)), 0, -1)
                    if text.endswith(s[:k])), default=0)
        self._held = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def finish(self) -> str:
        held, self._held = self._held, ""
        return "" if self.hit else held
