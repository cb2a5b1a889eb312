"""How a tool-loop turn looks in the chat, and how the history keeps the exact messages the model saw.

The page shows a turn as Chatbot messages (plain dicts in Gradio's "messages" format):
- the model's text, as ordinary assistant messages;
- each call as a collapsible step: ``metadata`` ``title`` (the tool or "Code interpreter") and
  ``status`` ("pending" while it runs, "done" after, which Gradio shows collapsed); its content shows
  the call (tool arguments as JSON, or the code) and the result or error, never ``tool_call(...)``;
- images the code produced, as image messages after their step;
- a note when the turn stopped early (the round bound).

The exact messages a step stands for (the assistant message with its metadata line, then the tool's
result) travel in the step's ``metadata["id"]``, as the model family's step payload (``ToolCalls.step_payload``
and ``step_messages``; ``families.registry.tool_calls()``). Gradio's Chatbot keeps
``id`` as it is through every round trip (the browser, the BrowserState-kept history, the function's
``history`` argument) but drops unknown metadata keys and re-indents text content, so the id is the one
place that survives exactly. ``step_messages(message)`` reads it back when the next prompt is built.
"""

from __future__ import annotations

import json

from chatglm_web.families.registry import tool_calls
from chatglm_web.generation import TextDelta
from chatglm_web.tools.agent import AgentDone, MessageDone, Step, StepFinished, StepStarted


def step_messages(message: dict) -> list[dict] | None:
    """The messages an assistant Chatbot message stands for when it is not plain text: a step's call and
    result, or ``[]`` for what the model never saw (a note, an image). None: plain text."""
    metadata = message.get("metadata") if isinstance(message.get("metadata"), dict) else {}
    payload = metadata.get("id")
    if isinstance(payload, str):
        kept = tool_calls().step_messages(payload)
        if kept is not None:
            return kept
    if metadata.get("title") or _is_file(message.get("content")):
        return []
    return None


def _is_file(content) -> bool:
    items = content if isinstance(content, list) else [content]
    return bool(items) and all(isinstance(item, dict) and ("path" in item or item.get("type") == "file"
                                                            or "file" in item) for item in items)


def _fence(text: str, language: str = "") -> str:
    """``text`` in a Markdown code block whose fence is longer than any backtick run inside it."""
    longest, run = 0, 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return f"{fence}{language}\n{text}\n{fence}"


def step_title(step: Step) -> str:
    what = "Code interpreter" if step.kind == "interpreter" else f"Tool: {step.name}"
    if step.status == "pending":
        return f"🛠️ {what} — running…"
    return f"🛠️ {what}" + ("" if step.ok else " — failed")


def step_content(step: Step) -> str:
    if step.code is not None:
        parts = ["**Code**", _fence(step.code, "python")]
    elif step.arguments is not None:
        parts = [f"**Call** `{step.name}`", _fence(json.dumps(step.arguments, ensure_ascii=False, indent=2), "json")]
    else:  # not parsed: show what the model wrote, as text
        parts = [f"**Call** `{step.name}` (not run)", _fence(step.call.get("content", ""))]
    if step.status == "pending":
        return "\n\n".join(parts)
    if step.error:
        parts.append(f"**Error** {step.error}")
    parts += ["**Result**" if step.ran else "**Sent back to the model**", _fence(step.output)]
    return "\n\n".join(parts)


def step_message(step: Step) -> dict:
    metadata = {"title": step_title(step), "status": step.status}
    if step.status == "done":
        metadata["duration"] = round(step.seconds, 2)
        metadata["id"] = tool_calls().step_payload([step.call, step.observation])
    return {"role": "assistant", "content": step_content(step), "metadata": metadata}


class TurnView:
    """The Chatbot messages of one turn, updated from the tool loop's events."""

    def __init__(self):
        self.messages: list[dict] = []
        self._text: dict | None = None  # the text message being streamed
        self._step_index: int | None = None

    def apply(self, event, images: list[str] = ()) -> None:
        if isinstance(event, TextDelta):
            if self._text is None:
                self._text = {"role": "assistant", "content": ""}
                self.messages.append(self._text)
            self._text["content"] += event.text
        elif isinstance(event, MessageDone):
            if not event.message.get("metadata") and self._text is not None:
                self._text["content"] = event.message["content"]  # exact
            self._text = None
        elif isinstance(event, StepStarted):
            self._text = None
            self._step_index = len(self.messages)
            self.messages.append(step_message(event.step))
        elif isinstance(event, StepFinished):
            self.messages[self._step_index] = step_message(event.step)
            self.messages += [{"role": "assistant", "content": {"path": path, "mime_type": "image/png"}}
                              for path in images]
        elif isinstance(event, AgentDone) and event.note:
            self.messages.append({"role": "assistant", "content": event.note,
                                  "metadata": {"title": "⚠️ Stopped before a final answer", "status": "done"}})
