"""``LocalBackend``: the ``ChatBackend`` for a model loaded in this process.

messages -> checked (roles, characters per message) before any tokenizing
         -> fitted to the context off the event loop, newest message first, each message
            tokenized once (oldest turns dropped, system prompt kept; a reply budget larger
            than what the context leaves is lowered)
         -> prompt ids (the model family's ``ChatFormat``) -> the shared engine (``engine.protocol``)
         -> generated ids -> visible text pieces (and a family's metadata lines) -> ``ChatEvent``s
Every request ends with one log line: its outcome, token counts and duration.

``preview(messages, params)`` runs the same checks and fitting (``prepare``) and describes the prompt ids
instead of submitting them (``PromptPreview``), so its counts are the request's own.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import AsyncIterator

from chatglm_web.families.chat_format import ReplyEvents, merge_text
from chatglm_web.engine.events import Done, QueuePosition, Token
from chatglm_web.settings import CHARS_PER_CONTEXT_TOKEN
from chatglm_web.engine.protocol import GenerationEngine
from chatglm_web.generation import (BackendBusy, ChatEvent, Finished, FinishReason, InvalidRequest, ModelInfo,
                                    PromptPreview, Queued, SamplingParams, check_valid_text)

log = logging.getLogger("chatglm_web.requests")

ROLES = {"system", "user", "assistant", "observation"}


def check_messages(messages, max_chars: int) -> None:
    """Roles, text and size of every message, without tokenizing (cheap even for huge input)."""
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("the conversation is empty")
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise InvalidRequest(f"each message needs a role out of {sorted(ROLES)}; got {message!r:.80}")
        content = message.get("content")
        if isinstance(content, str):
            if len(content) > max_chars:
                what = "The system prompt" if message["role"] == "system" else "A message"
                raise InvalidRequest(f"{what} is too long: {len(content):,} characters, the limit is "
                                     f"{max_chars:,}. Shorten it or split it into several messages.")
            check_valid_text(content)
    if messages[-1]["role"] not in ("user", "observation"):
        raise InvalidRequest("the last message must be the user's")
    if not str(messages[-1].get("content") or "").strip():
        raise InvalidRequest("The message is empty.")


def fit_to_context(messages: list[dict], chat_format, budget: int) -> tuple[list[int], int]:
    """Prompt ids of the longest suffix of the conversation that fits ``budget`` tokens.

    The leading system message is always kept, and the newest message always; older messages are
    dropped oldest first, a whole exchange at a time (the kept part starts with a user message),
    so the prompt never starts with an orphaned reply. Messages are measured newest first and
    the walk stops at the budget, so the cost follows what fits, not the length of the history.
    Returns (ids, number of dropped messages).
    """
    system = [m for m in messages[:1] if m["role"] == "system"]
    rest = messages[len(system):]
    used = chat_format.fixed_tokens + sum(chat_format.message_tokens(m) for m in system)
    start = len(rest)
    for index in range(len(rest) - 1, -1, -1):
        used += chat_format.message_tokens(rest[index])
        if used > budget:
            break
        if index == len(rest) - 1 or rest[index]["role"] == "user":
            start = index
    if start == len(rest):
        raise InvalidRequest(
            f"The message is too long: the prompt needs {used} tokens but only {budget} fit (the model's "
            "context minus room for the reply). Shorten it or lower max new tokens."
        )
    while True:
        ids = chat_format.prompt_ids(system + rest[start:])
        if len(ids) <= budget:
            return ids, start
        # an estimate was low (template formats): drop the next exchange and measure again
        later = [i for i in range(start + 1, len(rest)) if rest[i]["role"] == "user" or i == len(rest) - 1]
        if not later:
            raise InvalidRequest(
                f"The message is too long: the prompt needs {len(ids)} tokens but only {budget} fit (the "
                "model's context minus room for the reply). Shorten it or lower max new tokens."
            )
        start = later[0]


def kept_messages(messages: list[dict], dropped: int) -> list[dict]:
    """The messages a prompt holds after ``fit_to_context`` dropped ``dropped``: the leading system message
    (if any) and the rest from the ``dropped``-th non-system message on."""
    system = messages[:1] if messages and messages[0].get("role") == "system" else []
    return system + messages[len(system) + dropped:]


def describe_prompt(chat_format, messages: list[dict], ids: list[int], *, dropped: int, context_length: int,
                    budget: int, reply_budget: int, exact: bool = True) -> PromptPreview:
    """The ``PromptPreview`` of ``ids``, the prompt ``chat_format`` made of the kept ``messages``."""
    system, history, new = chat_format.prompt_split(messages, ids)
    return PromptPreview(total=len(ids), system=system, history=history, new=new, context_length=context_length,
                         budget=budget, reply_budget=reply_budget, dropped_messages=dropped,
                         text=chat_format.prompt_text(messages, ids), exact=exact)


class LocalBackend:
    def __init__(self, engine: GenerationEngine, chat_format, info: ModelInfo, *, max_input_tokens: int | None = None,
                 max_new_tokens: int | None = None, max_input_chars: int | None = None):
        self.engine = engine
        self.format = chat_format
        self.info = info
        self.max_input_tokens = max_input_tokens
        self.max_new_tokens = max_new_tokens or info.context_length
        self.max_input_chars = max_input_chars or CHARS_PER_CONTEXT_TOKEN * info.context_length

    def shutdown(self) -> None:
        self.engine.shutdown()

    async def health(self) -> tuple[bool, str]:
        """(ready, what is the matter): the model is loaded here, so the engine is all that can fail."""
        if not self.engine.alive:
            return False, "the generation engine has stopped"
        running, waiting = self.engine.load
        return True, f"model loaded, engine running ({running} replies running, {waiting} waiting)"

    def validate(self, messages: list[dict], params: SamplingParams) -> None:
        """Check the settings and the messages (what is allowed, how long); raises InvalidRequest."""
        params.validated(self.max_new_tokens)
        check_messages(messages, self.max_input_chars)

    def prompt_budget(self, params: SamplingParams) -> int:
        """The tokens a prompt may use: the context minus room for the reply (the requested max_new_tokens,
        or half the context when more is asked for), at most ``max_input_tokens``."""
        context = self.info.context_length
        budget = context - min(params.max_new_tokens, context // 2)
        return min(budget, self.max_input_tokens) if self.max_input_tokens else budget

    def prepare(self, messages: list[dict], params: SamplingParams) -> tuple[list[int], int, int]:
        """Validate and fit: (prompt ids, dropped message count, reply budget); raises InvalidRequest.

        The prompt may use ``prompt_budget(params)`` tokens. The reply budget is what the context then
        leaves, at most the requested max_new_tokens.
        """
        self.validate(messages, params)
        ids, dropped = fit_to_context(messages, self.format, self.prompt_budget(params))
        return ids, dropped, min(params.max_new_tokens, self.info.context_length - len(ids))

    def preview(self, messages: list[dict], params: SamplingParams) -> PromptPreview:
        """What ``stream_chat`` would submit, from the same ``prepare`` (see ``ChatBackend.preview``); exact."""
        ids, dropped, reply_budget = self.prepare(messages, params)
        return describe_prompt(self.format, kept_messages(messages, dropped), ids, dropped=dropped,
                               context_length=self.info.context_length, budget=self.prompt_budget(params),
                               reply_budget=reply_budget)

    async def stream_chat(self, messages: list[dict], params: SamplingParams) -> AsyncIterator[ChatEvent]:
        started = time.perf_counter()
        outcome = "rejected"
        count = prompt_tokens = 0
        try:
            self.engine.check_capacity()  # refuse a flood before spending any work on it
            ids, dropped, reply_budget = await asyncio.to_thread(self.prepare, messages, params)
            prompt_tokens = len(ids)
            clamped = reply_budget if reply_budget < params.max_new_tokens else None
            if clamped:
                params = params.model_copy(update={"max_new_tokens": reply_budget})
            request = self.engine.submit(ids, params, self.format.stop_token_ids)
        except (InvalidRequest, BackendBusy) as error:
            outcome = "busy" if isinstance(error, BackendBusy) else "invalid"
            log.info("request %s: %s", outcome, error)
            raise
        reply = ReplyEvents(self.format, params.stop)
        first = last = None
        outcome = "cancelled (Stop or disconnect)"  # unless the reply ends while this consumer listens
        try:
            async for events in request.batches():
                out = []
                for event in events:
                    if isinstance(event, QueuePosition):
                        yield Queued(event.position)
                    elif isinstance(event, Token):
                        last = time.perf_counter()
                        first = first or last
                        count += 1
                        out += reply.push(event.id)
                        if reply.stopped:
                            break
                    else:
                        out += reply.finish()
                for event in merge_text(out):
                    yield event
                done = events[-1] if isinstance(events[-1], Done) else None
                if reply.stopped or done:
                    reason = FinishReason.STOP if reply.stopped else done.reason
                    error = None if reply.stopped else done.error
                    outcome = reason if reason != FinishReason.ERROR else f"error ({error})"
                    yield Finished(
                        reason=reason,
                        prompt_tokens=len(ids),
                        completion_tokens=count,
                        seconds=(last - first) if first else 0.0,
                        time_to_first_token=(first - request.submitted_at) if first else 0.0,
                        dropped_messages=dropped,
                        error=error,
                        max_new_tokens_clamped=clamped,
                        metadata=reply.metadata,
                    )
                    return
        finally:
            request.cancel()  # the consumer stopped early (Stop button, disconnect): free the slot
            log.info("request %d: %s, prompt %d tokens, reply %d tokens, %.2f s", request.id, outcome,
                     prompt_tokens, count, time.perf_counter() - started)
