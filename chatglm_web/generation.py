"""The one generation interface shared by every entry point (the page, Gradio's API, later HTTP).

A ``ChatBackend`` takes a conversation (messages in the OpenAI/Gradio "messages" shape:
``{"role": ..., "content": str}``) and ``SamplingParams`` and streams ``ChatEvent``s:

    Queued(position)  while waiting for a slot (position 1 = next)
    TextDelta(text)   a piece of the visible reply; the pieces concatenate to the whole reply
    Finished(...)     once, last: why it ended and token counts / speed

``LocalBackend`` (``local_backend.py``) runs the model in this process; a remote
OpenAI-compatible server (vLLM, SGLang) can implement the same protocol.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import AsyncIterator, Protocol


class InvalidRequest(ValueError):
    """Bad input from a user or API client; the message is meant to be shown to them."""


class BackendBusy(RuntimeError):
    """The waiting queue is full; the client should try again shortly."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.8  # 0 = greedy
    top_p: float = 0.8
    top_k: int = 0  # 0 = off
    repetition_penalty: float = 1.0
    max_new_tokens: int = 1024
    seed: int | None = None  # None = a fresh random seed

    def validated(self, max_new_tokens_limit: int | None = None) -> "SamplingParams":
        """Return self, or raise ``InvalidRequest`` saying which value is out of range."""
        checks = [
            ("temperature", self.temperature, 0.0, 10.0),
            ("top_p", self.top_p, 0.0, 1.0),
            ("repetition_penalty", self.repetition_penalty, 0.01, 10.0),
        ]
        for name, value, low, high in checks:
            if not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
                raise InvalidRequest(f"{name} must be a number between {low} and {high}, got {value!r}")
        if self.top_p == 0.0:
            raise InvalidRequest("top_p must be greater than 0")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise InvalidRequest(f"top_k must be a whole number >= 0, got {self.top_k!r}")
        limit = max_new_tokens_limit or 1_000_000
        if not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= limit:
            raise InvalidRequest(f"max_new_tokens must be a whole number between 1 and {limit}, got {self.max_new_tokens!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or not 0 <= self.seed < 2**63):
            raise InvalidRequest(f"seed must be a whole number >= 0, got {self.seed!r}")
        return self


@dataclass(frozen=True)
class Queued:
    position: int


@dataclass(frozen=True)
class TextDelta:
    text: str


@dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (end of reply), "length" (token budget), "cancelled", "error"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0  # from the first generated token to the last
    time_to_first_token: float = 0.0  # from submission
    dropped_messages: int = 0  # oldest history messages left out to fit the context
    error: str | None = None

    @property
    def tokens_per_second(self) -> float:
        return (self.completion_tokens - 1) / self.seconds if self.seconds > 0 and self.completion_tokens > 1 else 0.0


ChatEvent = Queued | TextDelta | Finished


@dataclass
class ModelInfo:
    """What the page header shows about the loaded model."""

    name: str
    precision: str
    device: str
    context_length: int
    offline_demo: bool = False
    notes: list[str] = field(default_factory=list)


class ChatBackend(Protocol):
    info: ModelInfo

    def stream_chat(self, messages: list[dict], params: SamplingParams) -> AsyncIterator[ChatEvent]:
        """Stream the assistant's reply to ``messages`` (the last one is the user's new turn).

        Raises ``InvalidRequest`` for bad input and ``BackendBusy`` when the queue is full, before
        anything is yielded. Closing the iterator early cancels the generation.
        """
        ...
