"""Admission: how many requests run at once, how many may wait, and the busy message beyond that.
One policy, used by every way of generating: the scheduler (``Engine``), the engine process, ZeroGPU
and the remote backend.

    policy = AdmissionPolicy(max_running=8, max_waiting=32)
    policy.check(running, waiting)        # EngineBusy, with the one message, when the line is full
    policy.split(unfinished)              # (running, waiting) of requests counted together

``WaitingLine`` is the line itself for an engine that runs requests on its own threads (the
scheduler, ZeroGPU): requests in order, cancelled ones dropped, positions announced, taken while
slots are free. ``AdmissionLine`` is the same line on an event loop, for a backend whose server
does not queue visibly itself (a remote server):

    line = AdmissionLine(policy)
    place = line.join()                      # EngineBusy when the line is full
    try:
        async for position in place.wait():  # each change of position while waiting (1 = next)
            ...
        ... generate ...
    finally:
        place.leave()                        # frees the slot, or the place in line
"""

from __future__ import annotations

import asyncio
import collections
from dataclasses import dataclass

from chatglm_web.engine.request import GenerationRequest
from chatglm_web.generation import BackendBusy, FinishReason
from chatglm_web.settings import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_QUEUE


class EngineBusy(BackendBusy):
    """Every slot and every place in line is taken; the client should try again shortly."""


@dataclass(frozen=True)
class AdmissionPolicy:
    max_running: int = DEFAULT_MAX_BATCH_SIZE
    max_waiting: int = DEFAULT_MAX_QUEUE

    def __post_init__(self):
        object.__setattr__(self, "max_running", max(1, int(self.max_running)))
        object.__setattr__(self, "max_waiting", max(0, int(self.max_waiting)))

    def check(self, running: int, waiting: int) -> None:
        """Raise ``EngineBusy`` when ``running`` + ``waiting`` requests fill every slot and place in line."""
        if running + waiting >= self.max_running + self.max_waiting:
            raise EngineBusy(
                f"The server is busy: {running} replies are being written and {waiting} are waiting, "
                f"which is all it takes at once. Please try again in a moment."
            )

    def has_slot(self, running: int) -> bool:
        return running < self.max_running

    def split(self, unfinished: int) -> tuple[int, int]:
        """(running, waiting) of ``unfinished`` requests: the first ``max_running`` count as running."""
        running = min(unfinished, self.max_running)
        return running, unfinished - running


class WaitingLine:
    """Requests waiting for a slot, first come first served. Not locked: its engine holds its own lock."""

    def __init__(self, policy: AdmissionPolicy):
        self.policy = policy
        self._line: collections.deque[GenerationRequest] = collections.deque()

    def __len__(self) -> int:
        return len(self._line)

    def __iter__(self):
        return iter(self._line)

    def append(self, request: GenerationRequest) -> None:
        self._line.append(request)

    def drop_cancelled(self) -> None:
        """End every cancelled request still waiting (``CANCELLED``) and take it out of the line."""
        for request in [r for r in self._line if r.cancelled]:
            self._line.remove(request)
            request.end(FinishReason.CANCELLED)

    def take(self, running: int) -> list[GenerationRequest]:
        """The requests that get a slot now, ``running`` being taken already; the rest learn their positions."""
        taken = []
        while self._line and self.policy.has_slot(running + len(taken)):
            taken.append(self._line.popleft())
        for position, request in enumerate(self._line, start=1):
            request.queued_at(position)
        return taken

    def clear(self) -> list[GenerationRequest]:
        """Empty the line; the requests that were in it."""
        requests, self._line = list(self._line), collections.deque()
        return requests


class AdmissionLine:
    """The policy's line on one event loop (everything runs there, so no locks are needed)."""

    def __init__(self, policy: AdmissionPolicy):
        self.policy = policy
        self.running = 0
        self._line: collections.deque[Place] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._line)

    def check(self) -> None:
        """Raise ``EngineBusy`` if a request joining now would be refused."""
        self.policy.check(self.running, self.waiting)

    def join(self) -> "Place":
        self.check()
        place = Place(self)
        if self.policy.has_slot(self.running) and not self._line:
            self.running += 1
            place.admitted = True
        else:
            self._line.append(place)
        return place

    def _free(self) -> None:
        self.running -= 1
        admitted = []
        while self._line and self.policy.has_slot(self.running):
            place = self._line.popleft()
            self.running += 1
            place.admitted = True
            admitted.append(place)
        self._wake(admitted)

    def _remove(self, place: "Place") -> None:
        self._line.remove(place)
        self._wake()

    def position_of(self, place: "Place") -> int:
        return self._line.index(place) + 1

    def _wake(self, extra=()) -> None:
        """Every request in line (and ``extra`` just admitted) re-reads its position."""
        for place in [*extra, *self._line]:
            place.moved.set()


class Place:
    """One request's place: in line until ``admitted``, then holding a slot until ``leave()``."""

    def __init__(self, line: AdmissionLine):
        self.line = line
        self.admitted = False
        self.moved = asyncio.Event()
        self._left = False

    @property
    def position(self) -> int:
        return self.line.position_of(self)

    async def wait(self):
        """Yield this request's position each time it changes, until it holds a slot."""
        shown = None
        while not self.admitted:
            position = self.position
            if position != shown:
                shown = position
                yield position
                continue  # things may have moved while the consumer had the turn: look again
            self.moved.clear()  # no await between the look and the clear, so no move is missed
            await self.moved.wait()

    def leave(self) -> None:
        if self._left:
            return
        self._left = True
        if self.admitted:
            self.line._free()
        else:
            self.line._remove(self)
