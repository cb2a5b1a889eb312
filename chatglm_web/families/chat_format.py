"""How a model family turns messages into prompt ids and generated ids back into visible text.

``ChatGLM3Format``  native ChatGLM3 prompt (role tokens, metadata lines), sentencepiece only,
                    so user text can never become a special token; hides the reply's metadata line.
``TemplateFormat``  any Hugging Face chat model: the tokenizer's own chat template.

Both give: ``prompt_ids(messages)``, ``stop_token_ids``, ``text_stream()`` -> an object whose
``push(token_id)`` returns the new visible text, ``finish()`` the rest and ``take_metadata()`` a
ChatGLM3 message's metadata line once it is known (``ReplyEvents`` turns that into ``TextDelta`` /
``ReplyMetadata`` events, through the request's stop strings), and, for fitting a long
conversation into the context one message at a time, ``message_tokens(message)`` (what one message
adds to the prompt: exact for ChatGLM3, an estimate for templates; remembered for the last
``MESSAGE_COUNT_CACHE`` messages measured, as a conversation is measured again on every request and
every preview) and ``fixed_tokens`` (what every prompt has besides its messages). For showing a prompt:
``prompt_text(messages, ids)`` (the prompt as text, special tokens written out) and
``prompt_split(messages, ids)`` ((system, history, new) tokens, summing to ``len(ids)``).
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections import OrderedDict

from chatglm_web.families.chatglm3.reply import ReplyTextFilter
from chatglm_web.families.chatglm3.tokenizer import ChatGLM3Tokenizer
from chatglm_web.generation import ReplyMetadata, TextDelta
from chatglm_web.families.streaming_text import IncrementalDecoder, StopStrings


class _TextStream:
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


class _ChatGLM3TextStream(_TextStream):
    """ChatGLM3 reply ids -> visible text, message by message.

    The first line of each assistant message is its metadata (hidden from the text). ``<|assistant|>``
    inside a reply starts another message: the current one is flushed and a fresh decoder and filter
    take the next (its own metadata line, its own dummy-prefix space).
    """

    def __init__(self, tokenizer: ChatGLM3Tokenizer):
        super().__init__(tokenizer, ReplyTextFilter())
        self._tokenizer = tokenizer
        self._assistant_id = tokenizer.special_token_ids["<|assistant|>"]
        self._later_message = False  # the current message is not the reply's first
        self._announced = False

    def push(self, token_id: int) -> str:
        if token_id != self._assistant_id:
            return super().push(token_id)
        rest = self.finish()
        self._decoder, self._filter = IncrementalDecoder(self._tokenizer), ReplyTextFilter()
        self._later_message, self._announced = True, False
        return rest

    def take_metadata(self) -> str | None:
        metadata = self._filter.metadata
        if metadata is None or self._announced:
            return None
        self._announced = True
        metadata = metadata.strip()
        return metadata if metadata or self._later_message else None


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


def plain_text(content) -> str:
    """Message content as plain text: a string, or Gradio 6 content blocks ([{"type": "text", "text": ...}])."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    if isinstance(content, (list, tuple)):
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, dict) and block.get("type", "text") == "text" and "text" in block:
                parts.append(str(block["text"]))
            # files/images are not understood by a text model: left out of the prompt
        return "\n".join(parts)
    if content is None:
        return ""
    return str(content)


def normalize_messages(messages: list[dict]) -> list[dict]:
    """Keep role/content (+ChatGLM3 metadata/tools), flatten content to text."""
    out = []
    for message in messages:
        item = {"role": message.get("role"), "content": plain_text(message.get("content"))}
        for key in ("metadata", "tools"):
            if message.get(key) and isinstance(message.get(key), (str, list)):
                item[key] = message[key]
        out.append(item)
    return out


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


class ChatGLM3Format:
    def __init__(self, tokenizer: ChatGLM3Tokenizer):
        self.tokenizer = tokenizer
        self.stop_token_ids = list(tokenizer.stop_token_ids)
        self._counts = MessageCounts()

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self.tokenizer.build_chat_input(normalize_messages(messages))

    @property
    def fixed_tokens(self) -> int:
        return len(self.tokenizer.prefix_ids) + 1  # [gMASK] sop ... <|assistant|>

    def message_tokens(self, message: dict) -> int:
        """Exact: ChatGLM3 prompts are the concatenation of independently encoded messages."""
        return self._counts.get(normalize_messages([message])[0], self._count)

    def _count(self, message: dict) -> int:
        prefix = len(self.tokenizer.prefix_ids)
        return len(self.tokenizer.build_chat_input([message], add_generation_prompt=False)) - prefix

    def prompt_text(self, messages: list[dict], ids: list[int]) -> str:
        """The prompt ``ids`` as text, special tokens written out: ``[gMASK]sop<|user|>\\n hi<|assistant|>``."""
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def prompt_split(self, messages: list[dict], ids: list[int]) -> tuple[int, int, int]:
        """(system, history, new) tokens of ``ids``, the prompt of ``messages``: ``[gMASK] sop`` and the system
        message; the messages between; the last message and ``<|assistant|>``. Exact, and checked: the
        messages' counts and the fixed tokens must make up ``ids``."""
        counts = [self.message_tokens(m) for m in messages]
        if not counts or self.fixed_tokens + sum(counts) != len(ids):
            raise ValueError(f"{len(ids)} prompt ids are not the prompt of these {len(messages)} messages")
        prefix = len(self.tokenizer.prefix_ids)
        system = prefix + (counts[0] if messages[0].get("role") == "system" and len(messages) > 1 else 0)
        new = counts[-1] + self.fixed_tokens - prefix
        return system, len(ids) - system - new, new

    def text_stream(self) -> _TextStream:
        return _ChatGLM3TextStream(self.tokenizer)


class TemplateFormat:
    def __init__(self, tokenizer, stop_token_ids: list[int]):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template, so it is not a chat model")
        self.tokenizer = tokenizer
        self.stop_token_ids = list(stop_token_ids)
        self._counts = MessageCounts()

    fixed_tokens = 0  # the template's own text is counted per message (and checked on the final prompt)
    _PER_MESSAGE = 8  # role markers and separators of a typical template

    def _render(self, messages: list[dict], *, tokenize: bool, add_generation_prompt: bool = True):
        messages = [{"role": m["role"], "content": m["content"]} for m in normalize_messages(messages)]
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 tokenize=tokenize)
        if tokenize and hasattr(out, "keys"):  # BatchEncoding
            out = out["input_ids"]
        return list(out) if tokenize else out

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self._render(messages, tokenize=True)

    def message_tokens(self, message: dict) -> int:
        """An estimate (the content's tokens plus the usual markers); the final prompt is measured exactly."""
        return self._counts.get(normalize_messages([message])[0], self._estimate)

    def _estimate(self, message: dict) -> int:
        return len(self.tokenizer.encode(message["content"], add_special_tokens=False)) + self._PER_MESSAGE

    def prompt_text(self, messages: list[dict], ids: list[int]) -> str:
        """The chat template's text for ``messages`` (what ``ids`` encode), its markers written out."""
        return self._render(messages, tokenize=False)

    def prompt_split(self, messages: list[dict], ids: list[int]) -> tuple[int, int, int]:
        """(system, history, new) tokens of ``ids``, the prompt of ``messages``, by rendering the conversation up
        to the system message and up to the last message: the template's text before a message goes with it
        (without a system message, any fixed start goes with the first message). Sums to ``len(ids)``."""
        total = len(ids)
        has_system = messages[0].get("role") == "system" and len(messages) > 1
        system = len(self._render(messages[:1], tokenize=True, add_generation_prompt=False)) if has_system else 0
        system = min(system, total)
        before_new = system
        if len(messages) > (2 if has_system else 1):  # there is history
            before_new = len(self._render(messages[:-1], tokenize=True, add_generation_prompt=False))
        before_new = min(max(before_new, system), total)
        return system, before_new - system, total - before_new

    def text_stream(self) -> _TextStream:
        return _TextStream(self.tokenizer)
