"""Admission for a backend that does not queue visibly itself (a remote server): at most ``running``
requests at once, ``waiting`` more in line with their position, and everyone else told at once
that the server is busy, with the same rules and message as the local engine.

    line = AdmissionLine(running=8, waiting=32)
    place = line.join()                      # EngineBusy when the line is full
    try:
        async for position in place.wait():  # each change of position while waiting (1 = next)
            ...
        ... generate ...
    finally:
        place.leave()                        # frees the slot, or the place in line

Everything runs on one event loop (the server's), so no locks are needed.
"""

from __future__ import annotations

import asyncio
import collections

from chatglm_web.engine.scheduler import check_engine_capacity


class AdmissionLine:
    def __init__(self, running: int, waiting: int):
        self.max_running = max(1, running)
        self.max_waiting = max(0, waiting)
        self.running = 0
        self._line: collections.deque[Place] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._line)

    def check(self) -> None:
        """Raise ``EngineBusy`` if a request joining now would be refused."""
        check_engine_capacity(self.running, self.waiting, self.max_running, self.max_waiting)

    def join(self) -> "Place":
        self.check()
        place = Place(self)
        if self.running < self.max_running and not self._line:
            self.running += 1
            place.admitted = True
        else:
            self._line.append(place)
        return place

    def _free(self) -> None:
        self.running -= 1
        admitted = []
        while self._line and self.running < self.max_running:
            place = self._line.popleft()
            self.running += 1
            place.admitted = True
            admitted.append(place)
        self._wake(admitted)

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
        return self.line._line.index(self) + 1

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
            self.line._line.remove(self)
            self.line._wake()
