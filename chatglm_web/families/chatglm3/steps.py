"""A tool step's exact ChatGLM3 messages, kept by the page as one string.

The page shows a step as a collapsible Chatbot message; the messages it stands for (the assistant message
with its metadata line, then the ``observation``) travel in that message's ``metadata["id"]`` as
``"chatglm3:" + JSON`` (the one place Gradio keeps exactly through every round trip, see ``page/steps.py``).
The prefix is part of what browsers have stored: it stays.

    step_payload(messages) -> "chatglm3:[...]"
    step_messages(payload) -> the messages; [] for a payload that cannot be read; None for another string
"""

from __future__ import annotations

import json

PAYLOAD_PREFIX = "chatglm3:"


def step_payload(messages: list[dict]) -> str:
    return PAYLOAD_PREFIX + json.dumps(messages, ensure_ascii=False)


def step_messages(payload: str) -> list[dict] | None:
    if not isinstance(payload, str) or not payload.startswith(PAYLOAD_PREFIX):
        return None
    try:
        kept = json.loads(payload[len(PAYLOAD_PREFIX):])
    except ValueError:
        return []
    return [_message(m) for m in kept if isinstance(m, dict)] if isinstance(kept, list) else []


def _message(message: dict) -> dict:
    out = {"role": str(message.get("role")), "content": str(message.get("content", ""))}
    if message.get("metadata"):
        out["metadata"] = str(message["metadata"])
    return out
