"""OpenAI's tool calling on ChatGLM3's format, for ``/v1/chat/completions``.

In: ``tools`` (``[{"type": "function", "function": {"name", "description", "parameters"}}]``) go on the
ChatGLM3 system message as ``tools`` (name, description, parameters), after the request's own system
prompt or under the official tools prompt; ``tool_choice`` "auto" (the default) or "none" (the tools are
not shown to the model); anything else is refused. An assistant message's ``tool_calls`` become ChatGLM3
call messages (metadata = the function name, content = a ```python block with ``tool_call(k=v, ...)``,
the arguments written as Python literals, a name that is not an identifier as ``**{"a b": v}``), and each
``tool`` message an ``observation``. Arguments must be JSON (no NaN or Infinity), at most
``strict_json.MAX_JSON_DEPTH`` levels deep.

Out: a reply whose last message is a call (a metadata line, then ``tool_call(...)``, parsed with
``ast``, never evaluated) is returned as ``tool_calls`` with the arguments as a JSON string. A call that
does not parse is returned as text.
"""

from __future__ import annotations

import json
import keyword
import unicodedata
import uuid

from pydantic import BaseModel, ConfigDict, Field

from chatglm_web.api import strict_json
from chatglm_web.families.chat_format import normalize_messages
from chatglm_web.families.chatglm3.reply import ToolCallError, parse_reply
from chatglm_web.generation import InvalidRequest, ReplyMetadata, TextDelta
from chatglm_web.tools.registry import TOOLS_SYSTEM_PROMPT


class FunctionSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1, max_length=64)
    description: str = ""
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})


class ToolSpec(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str = "function"
    function: FunctionSpec


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    arguments: str = "{}"


class ToolCallIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    type: str = "function"
    function: FunctionCall


def check_tool_choice(tools: list[ToolSpec] | None, tool_choice) -> list[dict]:
    """The tools to show the model (ChatGLM3's shape), or [] ; ``InvalidRequest`` for what is not supported."""
    if tool_choice not in (None, "auto", "none"):
        raise InvalidRequest(f"tool_choice must be \"auto\" or \"none\" here (ChatGLM3 cannot be forced to call a "
                             f"tool), got {json.dumps(tool_choice)[:80]}", param="tool_choice")
    for index, tool in enumerate(tools or []):
        if tool.type != "function":
            raise InvalidRequest(f"tools[{index}].type must be \"function\", got {tool.type!r}",
                                 param=f"tools.{index}.type")
    if not tools or tool_choice == "none":
        return []
    return [{"name": t.function.name, "description": t.function.description, "parameters": t.function.parameters}
            for t in tools]


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
    argument; ``chatglm3.reply.parse_tool_call`` reads back an equal dict (tests/test_tool_call_roundtrip.py)."""
    return ", ".join(f"{name}={_python_literal(value)}" if _keyword_name(name)
                     else f"**{{{_python_literal(name)}: {_python_literal(value)}}}"
                     for name, value in arguments.items())


def call_message(call: dict) -> dict:
    """An OpenAI tool call -> the ChatGLM3 assistant message that makes it."""
    function = call.get("function") or {}
    name = function.get("name")
    try:
        arguments = strict_json.loads(function.get("arguments") or "{}")
    except ValueError as error:
        raise InvalidRequest(f"tool call {name!r}: arguments is not valid JSON: {error}", param="messages") from None
    if not isinstance(arguments, dict):
        raise InvalidRequest(f"tool call {name!r}: arguments must be a JSON object", param="messages")
    return {"role": "assistant", "metadata": name or "",
            "content": f"```python\ntool_call({render_arguments(arguments)})\n```"}


def chatglm3_messages(messages: list[dict], tools: list[dict]) -> list[dict]:
    """API messages (tool calls and tool results included) -> ChatGLM3 messages, tools on the system message."""
    out = []
    for message in messages:
        role = message.get("role")
        if role == "tool":
            out.append({"role": "observation", "content": normalize_messages([message])[0]["content"]})
            continue
        plain = normalize_messages([{"role": role, "content": message.get("content")}])[0]
        if role == "assistant" and message.get("tool_calls"):
            if plain["content"].strip():
                out.append(plain)
            out += [call_message(call) for call in message["tool_calls"]]
            continue
        out.append(plain)
    if tools:
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "tools": tools}
        else:
            out.insert(0, {"role": "system", "content": TOOLS_SYSTEM_PROMPT, "tools": tools})
    return out


class ReplyParts:
    """A streamed reply split into its ChatGLM3 messages (``ReplyMetadata`` starts a new one)."""

    def __init__(self):
        self.parts: list[dict] = [{"metadata": "", "content": ""}]

    def add(self, event) -> None:
        if isinstance(event, ReplyMetadata):
            if self.parts[-1]["metadata"] or self.parts[-1]["content"]:
                self.parts.append({"metadata": event.text, "content": ""})
            else:
                self.parts[-1]["metadata"] = event.text
        elif isinstance(event, TextDelta):
            self.parts[-1]["content"] += event.text

    @property
    def in_call(self) -> bool:
        """The message being written is a call (its metadata line is a name)."""
        return bool(self.parts[-1]["metadata"])

    @property
    def text(self) -> str:
        """Every message's text, as a reply without tools returns it."""
        return "".join(part["content"] for part in self.parts)

    @property
    def answer_text(self) -> str:
        """The text of the plain messages before a final call."""
        return "".join(part["content"] for part in self.parts[:-1] if not part["metadata"])


def tool_calls_out(reply: ReplyParts) -> list[dict] | None:
    """The reply's final call in OpenAI's shape, or None (no call, or one that does not parse)."""
    last = reply.parts[-1]
    if not last["metadata"]:
        return None
    try:
        parsed = parse_reply(f"{last['metadata']}\n{last['content']}", tools_available=True)
        # literals JSON has no form for (a set, bytes, a complex number, inf from 1e999): not a call to pass on
        arguments = json.dumps(parsed.tool_call.arguments, ensure_ascii=False, allow_nan=False)
    except (ToolCallError, TypeError, ValueError, RecursionError):
        return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": parsed.tool_call.name, "arguments": arguments}}]
