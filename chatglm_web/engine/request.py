"""A handle on one submitted generation, and the rule for when a reply ends.

The consumer's side:

    for event in request: ...                 # QueuePosition | Token | Done (events.py), Done last
    async for events in request.batches(): ...  # or lists of them, from the event loop that submitted
    request.cancel()                          # the engine frees its slot at its next step

The engine's side (whatever runs it: the scheduler, the engine process's reader, ZeroGPU):
``queued_at(position)``, ``token(id)``, ``end(reason, error)``, or ``deliver(event)`` for an event
that arrived as data. Events after the ``Done`` are dropped, so a request ends exactly once.

Hooks given at construction: ``on_event(event)`` takes the events instead of the iterators (the
engine process forwards them over its pipe); ``on_done(done)`` runs once when it ends (an engine
forgets it); ``on_cancel()`` runs once on the first ``cancel()`` (an engine that must act at once:
tell another process, free a queue place).
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
import time

from chatglm_web.engine.events import Done, EngineEvent, QueuePosition, Token
from chatglm_web.generation import FinishReason, SamplingParams


def finish_reason(token: int, *, generated: int, length: int, params: SamplingParams, stop_ids,
                  max_length: int) -> FinishReason | None:
    """Why a reply ends with ``token``, its ``generated``-th token, at sequence ``length``: None to go on.

    ``STOP``: a stop token (not shown); ``LENGTH``: the last token of the reply budget or of the
    context (shown).
    """
    if token in stop_ids:
        return FinishReason.STOP
    if generated >= params.max_new_tokens or length >= max_length:
        return FinishReason.LENGTH
    return None


class GenerationRequest:
    _ids = itertools.count(1)

    def __init__(self, prompt_ids: list[int], params: SamplingParams, stop_ids, max_length: int, *,
                 on_event=None, on_done=None, on_cancel=None):
        if not prompt_ids:
            raise ValueError("empty prompt")
        self.id = next(self._ids)
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.stop_ids = frozenset(stop_ids)
        self.max_length = max_length
        self.submitted_at = time.perf_counter()
        self.cancel_event = threading.Event()  # set by cancel(); what a generation loop elsewhere may watch
        self._done: Done | None = None
        self._lock = threading.Lock()
        self._on_event, self._on_done, self._on_cancel = on_event, on_done, on_cancel
        self._position: int | None = None  # the last queue position sent
        try:
            self._loop = asyncio.get_running_loop()
            self._async_queue: asyncio.Queue | None = asyncio.Queue()
        except RuntimeError:
            self._loop, self._async_queue = None, None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    # -- the consumer's side --------------------------------------------------------------------
    def cancel(self) -> None:
        """Ask the engine to stop this request (no-op once it has ended)."""
        if self.cancel_event.is_set():
            return
        self.cancel_event.set()
        if self._on_cancel is not None and self._done is None:
            self._on_cancel()

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    @property
    def done(self) -> Done | None:
        """How it ended, once it has (the ``Done`` event); None while it runs or waits."""
        return self._done

    def finish_reason(self, token: int, *, generated: int, length: int) -> FinishReason | None:
        """``finish_reason`` with this request's settings, or ``CANCELLED`` once it is cancelled."""
        if self.cancelled:
            return FinishReason.CANCELLED
        return finish_reason(token, generated=generated, length=length, params=self.params,
                             stop_ids=self.stop_ids, max_length=self.max_length)

    def __iter__(self):
        while True:
            event = self._queue.get()
            yield event
            if isinstance(event, Done):
                return

    async def __aiter__(self):
        async for events in self.batches():
            for event in events:
                yield event

    async def batches(self):
        """Lists of events: each waits for one, then takes all that already arrived.

        A consumer slower than the decode loop (a busy server) then handles several tokens per
        wake-up instead of falling further behind. Leaving early cancels the request.
        """
        if self._async_queue is None:
            raise RuntimeError("submit() the request from the event loop that iterates it")
        try:
            while True:
                events = [await self._async_queue.get()]
                while not self._async_queue.empty():
                    events.append(self._async_queue.get_nowait())
                yield events
                if isinstance(events[-1], Done):
                    return
        finally:
            self.cancel()  # no-op when it ended; frees the slot when the consumer went away

    # -- the engine's side ----------------------------------------------------------------------
    def queued_at(self, position: int) -> None:
        """Tell the consumer its queue position, once per change."""
        if position != self._position:
            self._position = position
            self.deliver(QueuePosition(position))

    def token(self, token_id: int) -> None:
        self.deliver(Token(token_id))

    def end(self, reason: FinishReason, error: str | None = None) -> None:
        self.deliver(Done(reason, error))

    def deliver(self, event: EngineEvent) -> None:
        """Hand one event to the consumer (nothing after the ``Done``)."""
        with self._lock:
            if self._done is not None:
                return
            if isinstance(event, Done):
                self._done = event
        if isinstance(event, Done) and self._on_done is not None:
            self._on_done(event)
        if self._on_event is not None:
            self._on_event(event)
        elif self._async_queue is None:
            self._queue.put(event)
        else:
            try:
                self._loop.call_soon_threadsafe(self._async_queue.put_nowait, event)
            except RuntimeError:  # the consumer's event loop is gone: nobody is listening
                self.cancel_event.set()
