"""ChatGLM3's chat format: messages -> prompt ids, reply ids -> visible text, one message at a time.

``ChatGLM3Format``      prompt ids equal to the official ``build_chat_input`` (``tokenizer.py``), exact token
                        counts per message, the prompt as text and its (system, history, new) split
``ChatGLM3TextStream``  a reply's ids -> visible text: each assistant message's first line is its metadata
                        (hidden, announced through ``take_metadata``); ``<|assistant|>`` inside a reply starts
                        another message
"""

from __future__ import annotations

from chatglm_web.families.chat_format import MessageCounts, TextStream
from chatglm_web.families.chatglm3.reply import ReplyTextFilter
from chatglm_web.families.chatglm3.tokenizer import ChatGLM3Tokenizer
from chatglm_web.families.chatglm3.tool_calls import TOOL_CALLS
from chatglm_web.families.streaming_text import IncrementalDecoder
from chatglm_web.messages import normalize_messages


class ChatGLM3TextStream(TextStream):
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


class ChatGLM3Format:
    """ChatGLM3's ``ChatFormat``: the native prompt (role tokens, metadata lines) from sentencepiece alone, so user
    text can never become a special token; the reply's metadata lines hidden from its text."""

    safe_prompt_ids = True   # a remote server is sent these ids (``/v1/completions``), not the messages
    tools = TOOL_CALLS

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

    def text_tokens(self, text: str) -> int:
        """Sentencepiece ids of ``text`` (never a special id)."""
        return len(self.tokenizer.encode(text))

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

    def text_stream(self) -> TextStream:
        return ChatGLM3TextStream(self.tokenizer)
