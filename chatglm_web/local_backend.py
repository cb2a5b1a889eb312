"""``LocalBackend``: the ``ChatBackend`` for a model loaded in this process.

messages -> checked and fitted to the context (oldest turns dropped, system prompt kept)
         -> prompt ids (the model family's ``ChatFormat``) -> the shared ``Engine``
         -> generated ids -> visible text pieces -> ``ChatEvent``s
"""

from __future__ import annotations

import time
from typing import AsyncIterator

from .engine import Engine
from .generation import ChatEvent, Finished, InvalidRequest, ModelInfo, Queued, SamplingParams, TextDelta

ROLES = {"system", "user", "assistant", "observation"}


def check_messages(messages) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("the conversation is empty")
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise InvalidRequest(f"each message needs a role out of {sorted(ROLES)}; got {message!r:.80}")
    if messages[-1]["role"] not in ("user", "observation"):
        raise InvalidRequest("the last message must be the user's")


def fit_to_context(messages: list[dict], prompt_ids, budget: int) -> tuple[list[int], int]:
    """Prompt ids of the longest suffix of the history that fits ``budget`` tokens.

    Leading system messages are always kept, and the newest message always; older messages are
    dropped oldest first, a whole exchange at a time (up to the next user message), so the
    prompt never starts with an orphaned assistant reply. Returns (ids, number of dropped messages).
    """
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system):]
    dropped = 0
    while True:
        ids = prompt_ids(system + rest[dropped:])
        if len(ids) <= budget:
            return ids, dropped
        if dropped >= len(rest) - 1:
            raise InvalidRequest(
                f"The message is too long: the prompt needs {len(ids)} tokens but only {budget} fit "
                "(context length minus the reply budget). Shorten it or lower max new tokens."
            )
        dropped += 1
        while dropped < len(rest) - 1 and rest[dropped]["role"] != "user":
            dropped += 1


class LocalBackend:
    def __init__(self, engine: Engine, chat_format, info: ModelInfo, *, max_input_tokens: int | None = None,
                 max_new_tokens: int | None = None):
        self.engine = engine
        self.format = chat_format
        self.info = info
        self.max_input_tokens = max_input_tokens
        self.max_new_tokens = max_new_tokens or info.context_length

    def prepare(self, messages: list[dict], params: SamplingParams) -> tuple[list[int], int]:
        """Validate and fit: (prompt ids, dropped message count); raises InvalidRequest."""
        params.validated(self.max_new_tokens)
        check_messages(messages)
        budget = self.info.context_length - params.max_new_tokens
        if self.max_input_tokens:
            budget = min(budget, self.max_input_tokens)
        if budget <= 0:
            raise InvalidRequest(
                f"max_new_tokens={params.max_new_tokens} leaves no room for the prompt in the "
                f"{self.info.context_length}-token context"
            )
        return fit_to_context(messages, self.format.prompt_ids, budget)

    async def stream_chat(self, messages: list[dict], params: SamplingParams) -> AsyncIterator[ChatEvent]:
        ids, dropped = self.prepare(messages, params)
        request = self.engine.submit(ids, params, self.format.stop_token_ids)
        text = self.format.text_stream()
        first = last = None
        count = 0
        try:
            async for events in request.batches():
                pieces = []
                for kind, value in events:
                    if kind == "queued":
                        yield Queued(value)
                    elif kind == "token":
                        last = time.perf_counter()
                        first = first or last
                        count += 1
                        pieces.append(text.push(value))
                    else:
                        pieces.append(text.finish())
                if "".join(pieces):
                    yield TextDelta("".join(pieces))
                kind, value = events[-1]
                if kind == "done":
                    error = value[len("error: "):] if value.startswith("error") else None
                    yield Finished(
                        reason="error" if error else value,
                        prompt_tokens=len(ids),
                        completion_tokens=count,
                        seconds=(last - first) if first else 0.0,
                        time_to_first_token=(first - request.submitted_at) if first else 0.0,
                        dropped_messages=dropped,
                        error=error,
                    )
        finally:
            request.cancel()  # the consumer stopped early (Stop button, disconnect): free the slot
