"""What a generation request streams, as data: typed events that cross threads and the engine
process's pipe as they are (plain frozen dataclasses pickle), and the reason a request ended.

    QueuePosition(position)   while waiting for a slot, once per change (1 = next)
    Token(id)                 one generated token id, in order
    Done(reason, error)       last: a ``FinishReason``; for ``ERROR``, what went wrong in words

A stop token is never sent as a ``Token``; the last token of a full reply budget is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from chatglm_web.generation import FinishReason


@dataclass(frozen=True, slots=True)
class QueuePosition:
    position: int

    def __reduce__(self):  # plain constructor arguments: pickled several times faster than a slots dataclass
        return QueuePosition, (self.position,)


@dataclass(frozen=True, slots=True)
class Token:
    id: int

    def __reduce__(self):
        return Token, (self.id,)


@dataclass(frozen=True, slots=True)
class Done:
    reason: FinishReason
    error: str | None = None

    def __reduce__(self):
        return Done, (str(self.reason), self.error)

    def __post_init__(self):
        object.__setattr__(self, "reason", FinishReason(self.reason))


EngineEvent = QueuePosition | Token | Done


def describe_failure(error: Exception) -> str:
    """A short, user-facing account of a generation failure (the ``error`` of a ``Done``)."""
    if isinstance(error, torch.OutOfMemoryError):
        return "the GPU ran out of memory for this request; try a shorter message or fewer max new tokens"
    return f"{type(error).__name__}: {error}"
