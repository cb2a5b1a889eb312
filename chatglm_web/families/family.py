"""What the rest of the app may ask of a model family, and nothing more.

    family = family_for(folder)                     # families.registry: the first family that detects it
    model, chat_format = family.load(folder, **from_pretrained_kwargs)
    chat_format.prompt_ids(messages), chat_format.text_stream(), ...   # ChatFormat
    chat_format.tools                               # ToolCalls, or None: this family cannot call tools

``ModelFamily``  detects a checkpoint folder, loads it (weights here) or only its tokenizer (a model served
                 elsewhere) as a ``ChatFormat``.
``ChatFormat``   messages -> prompt ids, generated ids -> visible text, token counts for fitting and
                 showing a prompt; ``tools`` says whether and how the format carries tool calls.
``ToolCalls``    a family's tool-call dialect: the system messages of the tool modes, a call written as an
                 assistant message and read back from one, a result as the message the model reads, and
                 the payload the page keeps a step's exact messages in.

Messages are plain dicts (``chatglm_web.messages``): ``{"role", "content"}``, an assistant message's
``metadata`` (its call's name) and a system message's ``tools`` (``[{"name", "description",
"parameters"}]``). Only the family knows how they become tokens.

May import: ``generation``, ``messages`` and the shared modules of ``families`` (never a family).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass
class ToolCall:
    """A call read from an assistant message: the tool's name and its arguments (literals only, never code)."""

    name: str
    arguments: dict


class ToolCallError(ValueError):
    """A reply announced a tool call whose text is not a call this family can read safely.

    ``metadata`` and ``content`` are the message as written, so a caller can show the raw reply instead."""

    def __init__(self, message: str, metadata: str = "", content: str = ""):
        super().__init__(message)
        self.metadata = metadata
        self.content = content


class ToolCalls(Protocol):
    """How a family offers tools and writes, reads and keeps tool calls."""

    def tools_system_message(self, tools: list[dict], system: dict | None = None) -> dict:
        """The system message offering ``tools``: ``system`` (the conversation's own) with them, or the family's
        own tools prompt with them when there is none."""
        ...

    def interpreter_system_message(self) -> dict:
        """The system message of the code interpreter mode."""
        ...

    def call_message(self, name: str, arguments: dict) -> dict:
        """The assistant message that calls ``name`` with ``arguments`` (a JSON object); ``read_call`` reads an
        equal call back."""
        ...

    def read_call(self, message: dict) -> ToolCall:
        """The call an assistant message (``metadata``, ``content``) makes; ``ToolCallError`` when it is not one
        that can be read safely (nothing is ever evaluated)."""
        ...

    def interpreter_code(self, message: dict) -> str | None:
        """The code of a code interpreter call ("" when it holds none); None: the message calls something else."""
        ...

    def result_message(self, content: str) -> dict:
        """A tool's (or the interpreter's) result as the message the model reads next."""
        ...

    def step_payload(self, messages: list[dict]) -> str:
        """A step's exact messages (the call and its result) as one string, for the page to keep."""
        ...

    def step_messages(self, payload: str) -> list[dict] | None:
        """The messages ``step_payload`` kept; ``[]`` for a payload of this family that cannot be read; None for
        a string that is not such a payload."""
        ...


class ChatFormat(Protocol):
    """A loaded family's prompts and replies. Picklable: it travels to the engine's process."""

    stop_token_ids: list[int]
    fixed_tokens: int          # what every prompt has besides its messages
    safe_prompt_ids: bool      # user text never becomes a special token: a remote server is sent these ids
    tools: ToolCalls | None    # None: the format cannot carry tool calls (no Tools or Code interpreter mode)

    def prompt_ids(self, messages: list[dict]) -> list[int]: ...

    def message_tokens(self, message: dict) -> int:
        """What one message adds to the prompt (exact, or an estimate where ``prompt_ids`` is measured)."""
        ...

    def text_tokens(self, text: str) -> int:
        """The tokens of plain text (never a special token): for fitting a document into a prompt."""
        ...

    def prompt_text(self, messages: list[dict], ids: list[int]) -> str:
        """The prompt ``ids`` of ``messages`` as text, special tokens written out."""
        ...

    def prompt_split(self, messages: list[dict], ids: list[int]) -> tuple[int, int, int]:
        """(system, history, new) tokens of ``ids``, summing to ``len(ids)``."""
        ...

    def text_stream(self):
        """A fresh ``chat_format.TextStream``: generated ids -> visible text, metadata lines."""
        ...


class ModelFamily(Protocol):
    name: str
    tools: ToolCalls | None

    def detects(self, folder: Path) -> bool:
        """Whether the checkpoint in ``folder`` is this family's (``config.json`` read as data)."""
        ...

    def load(self, folder: Path, **from_pretrained_kwargs) -> tuple[object, ChatFormat]:
        """(model, chat format) of a checkpoint this family detects."""
        ...

    def tokenizer_format(self, folder: Path) -> ChatFormat | None:
        """The chat format from tokenizer and config files only (a model served elsewhere); None when those
        files are not this family's, or give no chat format."""
        ...


def carries_tools(chat_format) -> bool:
    """Whether ``chat_format`` (or None) can carry tool calls."""
    return getattr(chat_format, "tools", None) is not None
