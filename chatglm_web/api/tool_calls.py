"""OpenAI's tool calling on the model family's tool-call dialect (``families.family.ToolCalls``, from
``families.registry.tool_calls()``), for ``/v1/chat/completions``.

In: ``tools`` (``[{"type": "function", "function": {"name", "description", "parameters"}}]``) go on the
system message as ``tools`` (name, description, parameters): the request's own system message, or the
family's tools prompt (``tools_system_message``); ``tool_choice`` "auto" (the default) or "none" (the tools
are not shown to the model); anything else is refused. An assistant message's ``tool_calls`` become the
family's call messages (``call_message``: the metadata line names the function; the arguments read back
equal), and each ``tool`` message the family's result message. Arguments must be JSON (no NaN or
Infinity), at most ``strict_json.MAX_JSON_DEPTH`` levels deep.

Out: a reply whose last message is a call (a metadata line, then the call, read by the family, never
evaluated: ``read_call``) is returned as ``tool_calls`` with the arguments as a JSON string. A call that
does not parse is returned as text.
"""

from __future__ import annotations

import json
import uuid

from pydantic import BaseModel, ConfigDict, Field

from chatglm_web.api import strict_json
from chatglm_web.families.family import ToolCallError
from chatglm_web.families.registry import tool_calls
from chatglm_web.generation import InvalidRequest, ReplyMetadata, TextDelta
from chatglm_web.messages import normalize_messages


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
    """The tools to show the model (a system message's ``tools``), or [] ; ``InvalidRequest`` for what is not
    supported."""
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


def call_message(call: dict) -> dict:
    """An OpenAI tool call -> the family's assistant message that makes it."""
    function = call.get("function") or {}
    name = function.get("name")
    try:
        arguments = strict_json.loads(function.get("arguments") or "{}")
    except ValueError as error:
        raise InvalidRequest(f"tool call {name!r}: arguments is not valid JSON: {error}", param="messages") from None
    if not isinstance(arguments, dict):
        raise InvalidRequest(f"tool call {name!r}: arguments must be a JSON object", param="messages")
    return tool_calls().call_message(name or "", arguments)


def model_messages(messages: list[dict], tools: list[dict]) -> list[dict]:
    """API messages (tool calls and tool results included) -> the model family's messages, tools on the system
    message."""
    calls = tool_calls()
    out = []
    for message in messages:
        role = message.get("role")
        if role == "tool":
            out.append(calls.result_message(normalize_messages([message])[0]["content"]))
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
            out[0] = calls.tools_system_message(tools, out[0])
        else:
            out.insert(0, calls.tools_system_message(tools))
    return out


class ReplyParts:
    """A streamed reply split into its assistant messages (``ReplyMetadata`` starts a new one)."""

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
        call = tool_calls().read_call(last)
        # literals JSON has no form for (a set, bytes, a complex number, inf from 1e999): not a call to pass on
        arguments = json.dumps(call.arguments, ensure_ascii=False, allow_nan=False)
    except (ToolCallError, TypeError, ValueError, RecursionError):
        return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": call.name, "arguments": arguments}}]
