"""What every family's chat format shares: visible text streams, reply events, remembered token counts.

``TextStream``    generated ids -> visible text (incremental detokenizing, then an optional text filter):
                  ``push(token_id)`` returns the new visible text, ``finish()`` the rest and
                  ``take_metadata()`` a message's metadata line once it is known (None for a family without)
``ReplyEvents``   a format's text stream -> ``ReplyMetadata`` / ``TextDelta`` events, cut at the request's
                  stop strings
``merge_text``    neighbouring ``TextDelta``s joined
``MessageCounts`` the token counts of the last ``MESSAGE_COUNT_CACHE`` messages measured (a conversation is
                  measured again on every request and every preview)

Each family's format (``chatglm3/format.py``, ``template/format.py``; the interface is ``family.ChatFormat``)
gives: ``prompt_ids(messages)``, ``stop_token_ids``, ``text_stream()``, and, for fitting a long conversation
into the context one message at a time, ``message_tokens(message)`` (what one message adds to the prompt:
exact or an estimate) and ``fixed_tokens`` (what every prompt has besides its messages). For showing a
prompt: ``prompt_text(messages, ids)`` (the prompt as text, special tokens written out) and
``prompt_split(messages, ids)`` ((system, history, new) tokens, summing to ``len(ids)``).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict

from chatglm_web.families.streaming_text import IncrementalDecoder, StopStrings
from chatglm_web.generation import ReplyMetadata, TextDelta

__all__ = [
    "MESSAGE_COUNT_CACHE",
    "MessageCounts",
    "ReplyEvents",
    "TextStream",
    "merge_text",
]


class TextStream:
    """Generated ids -> visible text: incremental detokenizing, then an optional text filter."""

    def __init__(self, tokenizer, text_filter=None):
        self._decoder = IncrementalDecoder(tokenizer)
        self._filter = text_filter

    def push(self, token_id: int) -> str:
        text = self._decoder.push(token_id)
        return self._filter.feed(text) if self._filter and text else text

    def finish(self) -> str:
        text = self._decoder.finish()
        if self._filter is None:
            return text
        return (self._filter.feed(text) if text else "") + self._filter.finish()

    def take_metadata(self) -> str | None:
        """A message's metadata line to announce, once (None: nothing new). Template formats have none."""
        return None


class ReplyEvents:
    """Generated ids -> ``ReplyMetadata`` / ``TextDelta`` events in order, cut at the request's stop strings.

    ``metadata`` is the last announced metadata line (the reply's last message's); ``stopped`` says
    a stop string was met (nothing is returned after it).
    """

    def __init__(self, chat_format, stop=()):
        self._text = chat_format.text_stream()
        self._stops = StopStrings(stop)
        self.metadata = ""

    @property
    def stopped(self) -> bool:
        return self._stops.hit

    def push(self, token_id: int) -> list:
        piece = self._stops.feed(self._text.push(token_id))
        events = []
        metadata = self._text.take_metadata()
        if metadata is not None and not self.stopped:
            self.metadata = metadata
            events.append(ReplyMetadata(metadata))
        if piece:
            events.append(TextDelta(piece))
        return events

    def finish(self) -> list:
        if self.stopped:
            return []
        piece = self._stops.feed(self._text.finish()) + self._stops.finish()
        return [TextDelta(piece)] if piece else []


def merge_text(events: list) -> list:
    """``events`` with neighbouring ``TextDelta``s joined (one update per batch of tokens)."""
    merged = []
    for event in events:
        if merged and isinstance(event, TextDelta) and isinstance(merged[-1], TextDelta):
            merged[-1] = TextDelta(merged[-1].text + event.text)
        else:
            merged.append(event)
    return merged


MESSAGE_COUNT_CACHE = 4096  # messages whose token counts a format remembers


class MessageCounts:
    """Token counts of the last ``size`` messages measured, least recently used forgotten first; thread-safe.

    Keyed by a 16-byte digest of the normalized message (role, content, metadata, tools), so the
    memory stays small however long the messages are.
    """

    def __init__(self, size: int = MESSAGE_COUNT_CACHE):
        self.size = size
        self._counts: OrderedDict[bytes, int] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def key(message: dict) -> bytes:
        text = json.dumps([message.get(k) for k in ("role", "content", "metadata", "tools")], ensure_ascii=False,
                          default=repr)
        return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()

    def get(self, message: dict, count) -> int:
        """The count of ``message`` (normalized), from ``count(message)`` the first time."""
        key = self.key(message)
        with self._lock:
            if key in self._counts:
                self._counts.move_to_end(key)
                return self._counts[key]
        value = count(message)  # outside the lock: tokenizing may take a while, other threads go on
        with self._lock:
            self._counts[key] = value
            self._counts.move_to_end(key)
            while len(self._counts) > self.size:
                self._counts.popitem(last=False)
        return value

    def __len__(self) -> int:
        return len(self._counts)

    def __getstate__(self) -> dict:   # a format travels to the engine process: the counts start afresh there
        return {"size": self.size}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["size"])
