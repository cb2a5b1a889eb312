"""ChatGLM3's tool-call dialect (``families.family.ToolCalls``): tools on the system message, calls written as
``tool_call(...)`` and read back with ``ast``, results as ``observation`` messages, steps kept as payloads.

A call is the assistant message whose metadata line is the tool's name and whose content is a ```python
block holding ``tool_call(k=v, ...)``: the arguments written as Python literals, a name that is not an
identifier as ``**{"a b": v}``. ``reply.parse_tool_call`` reads back an equal dict for every JSON object
of arguments (tests/test_tool_call_roundtrip.py). A code interpreter call's metadata line is
``interpreter`` and its content a ```python block of code.

    TOOL_CALLS.tools_system_message(tools, system=None), .interpreter_system_message()
    TOOL_CALLS.call_message(name, arguments), .read_call(message), .interpreter_code(message)
    TOOL_CALLS.result_message(content), .step_payload(messages), .step_messages(payload)
"""

from __future__ import annotations

import keyword
import unicodedata

from chatglm_web.families.chatglm3 import steps
from chatglm_web.families.chatglm3.reply import parse_reply, strip_code_fence
from chatglm_web.families.chatglm3.tool_prompts import INTERPRETER, INTERPRETER_SYSTEM_PROMPT, TOOLS_SYSTEM_PROMPT
from chatglm_web.families.family import ToolCall, ToolCallError


def _python_literal(value) -> str:
    """A JSON value as the Python literal ``ast.literal_eval`` reads back (true -> True, null -> None)."""
    return repr(value)


def _keyword_name(name: str) -> bool:
    """Whether ``name=`` reads back as ``name``: an identifier, no keyword, unchanged by the NFKC normalization
    Python applies to identifiers (``ﬁ`` would become ``fi``), and not ``__debug__`` (not assignable)."""
    return (name.isidentifier() and not keyword.iskeyword(name) and name != "__debug__"
            and unicodedata.normalize("NFKC", name) == name)


def render_arguments(arguments: dict) -> str:
    """``tool_call(...)``'s arguments: ``name=value``, or ``**{"name": value}`` for a name that cannot be a keyword
    argument; ``reply.parse_tool_call`` reads back an equal dict (tests/test_tool_call_roundtrip.py)."""
    return ", ".join(f"{name}={_python_literal(value)}" if _keyword_name(name)
                     else f"**{{{_python_literal(name)}: {_python_literal(value)}}}"
                     for name, value in arguments.items())


class ChatGLM3ToolCalls:
    """ChatGLM3's ``ToolCalls``; stateless (``TOOL_CALLS`` is the one instance)."""

    def tools_system_message(self, tools: list[dict], system: dict | None = None) -> dict:
        if system is not None:
            return {**system, "tools": tools}
        return {"role": "system", "content": TOOLS_SYSTEM_PROMPT, "tools": tools}

    def interpreter_system_message(self) -> dict:
        return {"role": "system", "content": INTERPRETER_SYSTEM_PROMPT}

    def call_message(self, name: str, arguments: dict) -> dict:
        return {"role": "assistant", "metadata": name or "",
                "content": f"```python\ntool_call({render_arguments(arguments)})\n```"}

    def read_call(self, message: dict) -> ToolCall:
        parsed = parse_reply(f"{message.get('metadata', '')}\n{message.get('content', '')}", tools_available=True)
        if parsed.tool_call is None:
            raise ToolCallError("the message has no metadata line: it is not a tool call", parsed.metadata,
                                parsed.content)
        return parsed.tool_call

    def interpreter_code(self, message: dict) -> str | None:
        if message.get("metadata") != INTERPRETER:
            return None
        return strip_code_fence(message.get("content", ""))

    def result_message(self, content: str) -> dict:
        return {"role": "observation", "content": content}

    def step_payload(self, messages: list[dict]) -> str:
        return steps.step_payload(messages)

    def step_messages(self, payload: str) -> list[dict] | None:
        return steps.step_messages(payload)


TOOL_CALLS = ChatGLM3ToolCalls()
