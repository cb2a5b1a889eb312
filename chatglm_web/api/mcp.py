"""The chat and the tools as an MCP server (``--mcp``), served by Gradio beside the page.

Gradio turns each public API endpoint of the page into an MCP tool at ``/gradio_api/mcp/`` (streamable
HTTP; ``/gradio_api/mcp/sse`` for SSE clients). With ``--mcp`` they are:

- ``chat``: one reply of the model to a message, with an optional system prompt and the sampling settings
  (``SamplingParams``' own defaults and ranges), through the same backend, queue and limits as the page. Each
  call is a conversation of its own. (The page's ``/chat`` endpoint, which keeps a Gradio client's
  conversation from call to call, stays callable but is not listed: MCP calls share no session.)
- one tool for each tool of the registry (``assets/tools/``): the same name, description and parameters the
  model is offered, each call checked against the tool's schema and run in a tool worker with the same
  timeout (``tools.registry``). A call that fails comes back as an MCP error with the registry's message.

Behind the same login and API key as the rest: ``http_guard.HttpGuard`` answers 401 on the MCP routes
without ``Authorization: Bearer <api key>`` (with ``--api-key``) or the page's login as HTTP Basic (with
``--auth``), and counts wrong credentials as failed logins of the client.
"""

from __future__ import annotations

import inspect
import json
import keyword
import logging
import re

import gradio as gr

from chatglm_web.generation import BackendBusy, Finished, InvalidRequest, SamplingParams, TextDelta, option

#: JSON schema types -> the Python type hints Gradio derives an endpoint's (and the MCP tool's) schema from.
_TYPES = {"string": str, "integer": int, "number": float, "boolean": bool, "array": list, "object": dict}
log = logging.getLogger(__name__)


def tool_endpoint(tool, call):
    """A typed function Gradio can serve for registry tool ``tool``: its parameters are the tool's, in the
    schema's order, required ones first; ``call(name, arguments)`` runs it and returns a ``ToolResult``."""
    properties = tool.parameters.get("properties", {})
    required = [name for name in properties if name in tool.parameters.get("required", [])]
    optional = [name for name in properties if name not in required]
    for name in properties:
        if not name.isidentifier() or keyword.iskeyword(name):
            raise ValueError(f"tool {tool.name}: the parameter name {name!r} cannot be an MCP tool's argument")

    def run(*values):
        arguments = {name: value for name, value in zip([*required, *optional], values)
                     if not (name in optional and value is None)}
        result = call(tool.name, arguments)
        if not result.ok:
            raise gr.Error(result.content, print_exception=False)
        return result.content

    parameters = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                    annotation=_TYPES.get(properties[name].get("type"), str),
                                    **({} if name in required else {"default": None}))
                  for name in [*required, *optional]]
    run.__signature__ = inspect.Signature(parameters, return_annotation=str)
    run.__annotations__ = {p.name: p.annotation for p in parameters} | {"return": str}
    run.__name__ = re.sub(r"\W", "_", tool.name)
    run.__doc__ = tool.description + "\n\nArgs:\n" + "".join(
        f"    {name}: {_describe(properties[name])}\n" for name in [*required, *optional])
    return run


def _describe(schema: dict) -> str:
    words = " ".join(str(schema.get("description", "")).split()) or schema.get("type", "value")
    if "enum" in schema:
        words += " (one of " + ", ".join(json.dumps(v, ensure_ascii=False) for v in schema["enum"]) + ")"
    return words


def chat_endpoint(backend):
    """The ``chat`` tool: the whole reply as text, or an MCP error saying what was wrong (bad settings, busy,
    generation failed)."""

    async def chat(message: str, system_prompt: str = "", temperature: float = option("temperature").default,
                   top_p: float = option("top_p").default, max_new_tokens: int = option("max_new_tokens").default,
                   seed: int = -1) -> str:
        """One reply of the model to a message (a conversation of its own).

        Args:
            message: the user's message
            system_prompt: the system prompt; empty for the model's own
            temperature: randomness, 0 to 2; 0 = always the most likely token
            top_p: sample from the smallest set of tokens whose probability reaches top_p (0.05 to 1)
            max_new_tokens: the longest reply in tokens
            seed: the same seed and settings repeat a reply; -1 = a random seed
        """
        try:
            params = SamplingParams.from_form(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                              seed=None if seed == -1 else seed)
            messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
                {"role": "user", "content": message}]
            text, done = [], None
            async for event in backend.stream_chat(messages, params):
                if isinstance(event, TextDelta):
                    text.append(event.text)
                elif isinstance(event, Finished):
                    done = event
        except (InvalidRequest, BackendBusy) as error:
            raise gr.Error(str(error), print_exception=False) from None
        if done is None or done.error:
            raise gr.Error(f"The reply failed: {done.error if done else 'it ended early'}", print_exception=False)
        return "".join(text)

    return chat


def add_tools(page: gr.Blocks, backend, toolbox) -> list[str]:
    """Serve the ``chat`` tool and every tool of ``toolbox``'s registry as API endpoints of ``page`` (and so as
    MCP tools); the tools' names."""
    registry = toolbox.registry
    names = ["chat"]
    with page:
        gr.api(chat_endpoint(backend), api_name="mcp_chat", queue=False)
        for tool in registry.tools.values():
            try:
                endpoint = tool_endpoint(tool, lambda name, arguments: registry.call(name, arguments,
                                                                                      timeout=toolbox.tool_timeout))
            except ValueError as error:   # the model may still call it; MCP cannot name its arguments
                log.warning("MCP: tool %s is not offered: %s", tool.name, error)
                continue
            # not queued: Gradio's MCP server calls it directly (no loop back through its HTTP client)
            gr.api(endpoint, api_name=f"tool_{endpoint.__name__}", queue=False)
            names.append(tool.name)
    return names
