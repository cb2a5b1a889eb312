"""Parse ChatGLM3 replies: the text generated after ``<|assistant|>`` (stop token removed).

The first line of a reply is metadata. Empty metadata: the rest is the answer. Non-empty metadata
with tools in the system prompt: the rest is a tool call, a fenced code block holding
``tool_call(arg=value, ...)``, and the metadata line is the tool name.

    parse_reply(text, tools_available) -> ParsedReply(content, metadata, tool_call)
    strip_code_fence(content) -> the code of a ```python ... ``` block (a tool call, interpreter code)
    ReplyTextFilter().feed(delta) -> visible text; .metadata; .finish() -> rest

Decisions:
- ``ParsedReply.metadata`` is the raw first line ("" when the reply has no newline at all, or
  its first line is longer than ``MAX_METADATA_CHARS`` so it cannot be a tool name);
  ``ToolCall.name`` is that line stripped.
- Every non-tool-call content is ``.strip()``-ed (the official code strips only answers with empty
  metadata); newlines inside are kept.
- The official code ``eval``s the tool call. Here it is parsed with ``ast``: only a call of
  ``tool_call`` with keyword arguments whose values are literals (``ast.literal_eval``: strings,
  numbers, booleans, None, lists, tuples, dicts, sets). An argument whose name is not a Python
  identifier (``"a b"``, ``"class"``, ``"x=1, y"``) is written as ``**{"a b": 1}``, as the official
  ``eval`` also reads it: ``**`` of a dict literal with string keys is taken, each name once.
  Anything else - a malformed block, positional arguments, ``**`` of anything but such a dict,
  names, attribute access, calls such as ``__import__('os')`` - raises :class:`ToolCallError` (a
  ``ValueError``) and nothing is executed. ``ToolCallError`` carries ``metadata`` and ``content``
  so a caller can show the raw reply instead. ``tool_calls.render_arguments`` writes calls this way, so
  every JSON object of arguments reads back equal.
- Streaming: the visible pieces from :class:`ReplyTextFilter` concatenate to exactly
  ``parse_reply(full, tools_available=False).content``: leading whitespace of the content is
  dropped and trailing whitespace is held back until non-whitespace text follows it.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass

from chatglm_web.families.family import (  # the family-neutral shapes, re-exported here
    ToolCall,
    ToolCallError,
)

__all__ = [
    "MAX_METADATA_CHARS",
    "ParsedReply",
    "ReplyTextFilter",
    "ToolCall",
    "ToolCallError",
    "parse_reply",
    "parse_tool_call",
    "split_metadata",
    "strip_code_fence",
]


@dataclass
class ParsedReply:
    content: str
    metadata: str
    tool_call: ToolCall | None = None


# A metadata line is empty or a tool name. A first line longer than this comes from a model that
# does not follow the format: it is content, so it streams at once instead of being held back.
MAX_METADATA_CHARS = 64


def split_metadata(text: str) -> tuple[str, str]:
    """``(metadata, rest)``: the first line and what follows; no newline (or no short first line) means no metadata."""
    metadata, newline, rest = text.partition("\n")
    if not newline or len(metadata) > MAX_METADATA_CHARS:
        return "", text
    return metadata, rest


def strip_code_fence(content: str) -> str:
    """The code inside a fenced block (```` ```python ... ``` ````), or the stripped text when it has no fence."""
    code = content.strip()
    if code.startswith("```"):
        code = code.split("\n", 1)[1] if "\n" in code else ""
        if code.rstrip().endswith("```"):
            code = code.rstrip()[:-3]
    return code.strip()


def parse_tool_call(code: str) -> dict:
    """Keyword arguments of ``tool_call(...)`` in ``code``; raises ``ValueError`` unless they are literals."""
    try:
        tree = ast.parse(code, mode="eval")
    except SyntaxError as error:
        raise ValueError(f"tool call is not valid Python syntax: {error.msg}") from None
    except (RecursionError, MemoryError):
        raise ValueError("tool call is nested too deeply") from None
    call = tree.body
    if not (isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "tool_call"):
        raise ValueError("tool call must be a single call tool_call(name=value, ...)")
    if call.args:
        raise ValueError("tool_call() takes keyword arguments only")
    arguments = {}
    for keyword in call.keywords:
        if keyword.arg is None:  # **{"name that is not an identifier": value, ...}
            if not isinstance(keyword.value, ast.Dict) or None in keyword.value.keys:
                raise ValueError("tool_call() takes ** of a dict literal only")
            items = _literal(keyword.value, "**")
            if not all(isinstance(name, str) for name in items):
                raise ValueError("tool_call() takes ** of a dict with string keys only")
        else:
            items = {keyword.arg: _literal(keyword.value, keyword.arg)}
        for name, value in items.items():
            if name in arguments:
                raise ValueError(f"tool_call() got argument {name!r} twice")
            arguments[name] = value
    return arguments


def _literal(node: ast.expr, what: str):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        raise ValueError(f"tool_call() argument {what!r} is not a literal value") from None


def parse_reply(text: str, tools_available: bool) -> ParsedReply:
    """Split a reply into metadata and content; parse a tool call when tools are available."""
    metadata, content = split_metadata(text)
    if metadata.strip() and tools_available:
        try:
            arguments = parse_tool_call(strip_code_fence(content))
        except ValueError as error:
            raise ToolCallError(f"invalid tool call for {metadata.strip()!r}: {error}", metadata, content) from None
        return ParsedReply(content=content, metadata=metadata, tool_call=ToolCall(metadata.strip(), arguments))
    return ParsedReply(content=content.strip(), metadata=metadata)


class ReplyTextFilter:
    """Streaming view of a reply: hides the metadata line and the content's outer whitespace."""

    def __init__(self):
        self._head = ""            # text before the first newline, while it is still unknown
        self._metadata: str | None = None
        self._started = False      # a non-whitespace content character has been shown
        self._held = ""            # trailing whitespace not shown yet

    @property
    def metadata(self) -> str | None:
        """The raw metadata line once its newline has arrived, else None."""
        return self._metadata

    def _content(self, text: str) -> str:
        if not self._started:
            text = text.lstrip()
            if not text:
                return ""
            self._started = True
        text = self._held + text
        body = text.rstrip()
        self._held = text[len(body):]
        return body

    def feed(self, delta: str) -> str:
        """Add decoded text; return the part of the answer that can be shown now."""
        if self._metadata is None:
            self._head += delta
            if "\n" not in self._head and len(self._head) <= MAX_METADATA_CHARS:
                return ""
            self._metadata, delta = split_metadata(self._head)
            self._head = ""
        return self._content(delta)

    def finish(self) -> str:
        """Flush: a reply that never had a newline is all content."""
        if self._metadata is None:
            self._metadata = ""
            head, self._head = self._head, ""
            return self._content(head)
        return ""
