"""Small helpers for tests that talk to a ``ChatBackend`` directly."""

from __future__ import annotations

import asyncio

from chatglm_web.generation import Finished, TextDelta


def user(text: str) -> list[dict]:
    """A conversation of one user message."""
    return [{"role": "user", "content": text}]


async def collect(backend, messages, params) -> tuple[str, Finished | None]:
    """(the reply's text, its ``Finished`` event) of one ``stream_chat``."""
    text, done = "", None
    async for event in backend.stream_chat(messages, params):
        if isinstance(event, TextDelta):
            text += event.text
        elif isinstance(event, Finished):
            done = event
    return text, done


async def collect_together(backend, conversations: list, params: list) -> list[tuple[str, Finished | None]]:
    """``collect`` of the conversations at once (``params[i]`` for ``conversations[i]``), in their order."""
    return list(await asyncio.gather(*[collect(backend, m, p) for m, p in zip(conversations, params)]))
