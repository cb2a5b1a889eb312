"""The page's turn controls: send, stop, retry, undo, edit, clear (and its undo), as plain functions.

Every way to start a reply goes through the same four steps (wired in ``layout.py``)::

    begin   (no queue)  checks the message; outputs only States, so a refusal marks nothing visible
                        (``.failure`` then writes the reason in the statistics line)
    show    (no queue)  shows the message, switches Send to Stop, marks the chat busy
    respond (queued)    streams the reply into the chat and the statistics line
    finish  (no queue)  switches Stop back to Send, stores the conversation as it ended

``stop`` asks the running ``respond`` of its browser session (whatever started it) to stop: ``respond``
ends the generation, marks the reply stopped and returns, and ``finish`` runs as after any reply (no
event cancellation, whose late chunks could overwrite the marked reply). While the chat is busy
Retry, Undo and Edit do nothing and look disabled (the ``busy`` class). An error never shows twice: it
is written in the statistics line only; a turn that failed before any text gives the message back to
the input box and leaves the chat as it was, one that failed mid-reply keeps the text, marked failed.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from contextlib import aclosing, suppress

import gradio as gr

from ..chat_format import plain_text
from ..generation import BackendBusy, Finished, InvalidRequest
from .chat import check_text, printable, start_turn
from .markers import mark, while_streaming
from .strings import text, translate_error

log = logging.getLogger(__name__)

BUSY_CLASS = "busy"


class Controls:
    """Send/Stop and the busy flag, as the outputs ``busy, send, stop``."""

    @staticmethod
    def running():
        return True, gr.Button(visible=False), gr.Button(visible=True)

    @staticmethod
    def idle():
        return False, gr.Button(visible=True), gr.Button(visible=False)


class StopSignals:
    """Stop requests per browser session. ``respond`` waits on its session's signal beside the reply; a Stop
    that comes before ``respond`` has started is kept until it starts (``finish`` forgets one that came too late)."""

    def __init__(self):
        self._events: dict[str, asyncio.Event] = {}
        self._early: set[str] = set()

    def forget(self, session: str | None) -> None:
        self._early.discard(session)

    def request(self, session: str | None) -> None:   # on the event loop
        event = self._events.get(session)
        if event is not None:
            event.set()
        elif session:
            self._early.add(session)

    def watch(self, session: str | None) -> asyncio.Event:
        event = self._events[session] = asyncio.Event()
        if session in self._early:
            self._early.discard(session)
            event.set()
        return event

    def done(self, session: str | None) -> None:
        self._events.pop(session, None)


class Stopped(Exception):
    """The visitor pressed Stop."""


async def _until_stopped(updates, stop: asyncio.Event):
    """``updates`` until ``stop`` is set; then the pending step is cancelled and ``Stopped`` raised."""
    iterator = updates.__aiter__()
    while True:
        step = asyncio.ensure_future(iterator.__anext__())
        stopper = asyncio.ensure_future(stop.wait())
        try:
            done, _ = await asyncio.wait({step, stopper}, return_when=asyncio.FIRST_COMPLETED)
        except BaseException:   # cancelled (the visitor left): the stream must be idle before it is closed
            stopper.cancel()
            step.cancel()
            await asyncio.gather(step, return_exceptions=True)
            raise
        if step in done:
            stopper.cancel()
            try:
                yield step.result()
            except StopAsyncIteration:
                return
        else:
            step.cancel()
            with suppress(asyncio.CancelledError, StopAsyncIteration):
                await step
            raise Stopped


def _chat(history, busy: bool):
    return gr.Chatbot(value=history, elem_classes=[BUSY_CLASS] if busy else [])


class Refused(gr.Error):
    """A turn that does not start: the event chain ends here (no reply, no ``finish``), without a pop-up;
    the page's ``.failure`` step writes ``Refusals.pop(session)`` in the statistics line."""

    def __init__(self, message: str):
        super().__init__(message, visible=False, print_exception=False)


class Refusals:
    """Why the last turn of a browser session was refused, until the page's failure step shows it."""

    def __init__(self, limit: int = 1024):
        self.limit, self._messages = limit, OrderedDict()

    def refuse(self, request, message: str):
        session = getattr(request, "session_hash", None) or ""
        self._messages[session] = message
        self._messages.move_to_end(session)
        while len(self._messages) > self.limit:
            self._messages.popitem(last=False)
        return Refused(message)

    def pop(self, request) -> str:
        return self._messages.pop(getattr(request, "session_hash", None) or "", "")


def _accept(history: list, message, lang: str, refusals: Refusals, request):
    """(the conversation before the turn, the message to answer); ``Refused`` (the chain stops, the reason goes
    to the statistics line) when the turn cannot start."""
    message = plain_text(message) if message is not None else ""
    if not message.strip():
        raise refusals.refuse(request, text("empty_message", lang))
    try:
        check_text(message, None, None)
    except InvalidRequest as error:
        raise refusals.refuse(request, translate_error(str(error), lang)) from None
    return list(history or []), message


def show(before, message):
    """The accepted turn on the page: its message in the chat, the box emptied, Stop instead of Send.
    Outputs (chatbot, textbox, stats, busy, send, stop)."""
    return (_chat([*before, {"role": "user", "content": message}], True), gr.Textbox(value=""), "",
            *Controls.running())


class Begin:
    """The first step of every way to start a turn: outputs only States (before, pending), so that a refusal,
    raised as an error, marks nothing visible; ``show`` follows when it succeeded."""

    def __init__(self, refusals: Refusals):
        self.refusals = refusals

    def _idle(self, busy, lang, request) -> None:
        if busy:
            raise self.refusals.refuse(request, text("busy_now", lang))

    def send(self, message, history, busy, lang, request: gr.Request):
        self._idle(busy, lang, request)
        return _accept(history, message, lang, self.refusals, request)

    def example(self, history, busy, lang, selected: gr.SelectData, request: gr.Request):
        self._idle(busy, lang, request)
        value = selected.value
        return _accept(history, value.get("text") if isinstance(value, dict) else value, lang, self.refusals,
                       request)

    def retry(self, history, busy, lang, retry: gr.RetryData, request: gr.Request):
        """Answer the user message before the retried reply again (the reply and what followed go)."""
        self._idle(busy, lang, request)
        history = list(history or [])
        index = _user_at_or_before(history, retry.index)
        if index < 0:
            raise self.refusals.refuse(request, text("nothing_to_retry", lang))
        return _accept(history[:index], history[index]["content"], lang, self.refusals, request)

    def edit(self, history, busy, lang, edit: gr.EditData, request: gr.Request):
        """Answer the edited user message; the turns after it go."""
        self._idle(busy, lang, request)
        return _accept(list(history or [])[:edit.index], edit.value, lang, self.refusals, request)

    def refused(self, lang, request: gr.Request):
        """The failure step after a refused begin: the reason, once, in the statistics line."""
        return text("error", lang, error=self.refusals.pop(request) or text("server_error", lang))


def _user_at_or_before(history: list, index: int) -> int:
    index = min(index, len(history) - 1)
    while index >= 0 and not (isinstance(history[index], dict) and history[index].get("role") == "user"):
        index -= 1
    return index


def undo(history, busy, undone: gr.UndoData):
    """Take back the last exchange: its message returns to the input box. Nothing while a reply streams."""
    if busy:
        return gr.skip(), gr.skip(), gr.skip()
    history = list(history or [])
    index = _user_at_or_before(history, undone.index)
    if index < 0:
        return gr.skip(), gr.skip(), gr.skip()
    kept = history[:index]
    return kept, gr.Textbox(value=printable(plain_text(history[index]["content"]))), kept


async def respond(pending, history, system_prompt, temperature, top_p, max_new_tokens, top_k, repetition_penalty,
                  seed, mode, lang, toolbox=None, backend=None, stops: StopSignals | None = None,
                  request: gr.Request | None = None):
    """(chatbot, stats, textbox) updates of the reply to ``pending`` (the last message of ``history``)."""
    if pending is None:   # begin refused it
        yield gr.skip(), gr.skip(), gr.skip()
        return
    session = getattr(request, "session_hash", None)
    stops = stops if stops is not None else StopSignals()
    stop = stops.watch(session)
    try:
        async for update in _respond(pending, history, system_prompt, temperature, top_p, max_new_tokens, top_k,
                                     repetition_penalty, seed, mode, lang, toolbox, backend, stop, request):
            yield update
    finally:
        stops.done(session)


async def _respond(pending, history, system_prompt, temperature, top_p, max_new_tokens, top_k, repetition_penalty,
                   seed, mode, lang, toolbox, backend, stop: asyncio.Event, request):
    history = list(history or [])
    before = history[:-1]

    def given_back(error: str):
        return _chat(before, True), text("error", lang, error=translate_error(error, lang)), gr.Textbox(value=pending)

    try:
        turn = await start_turn(backend, toolbox, pending, before, system_prompt, mode, request, lang,
                                temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, top_k=top_k,
                                repetition_penalty=repetition_penalty, seed=seed)
    except (InvalidRequest, BackendBusy) as error:
        yield given_back(str(error))
        return
    except Exception:
        log.exception("chat request failed")
        yield given_back(text("server_error", lang))
        return
    shown, stats = history, ""
    try:
        async with aclosing(turn) as updates:
            async for update in _until_stopped(updates, stop):
                if isinstance(update, Finished):
                    if update.reason == "error":
                        error = text("generation_failed", lang, error=translate_error(update.error, lang))
                        if shown is history:   # nothing came: the message goes back to the box
                            yield given_back(text("generation_failed", "en", error=update.error))
                        else:
                            yield _chat(mark(shown, "failed", lang, update.error), True), \
                                text("error", lang, error=error), gr.skip()
                    elif update.reason == "length":
                        yield _chat(mark(shown, "length", lang), True), stats, gr.skip()
                    continue
                reply, line = update
                if isinstance(reply, str):
                    shown = history + [{"role": "assistant", "content": reply}] if reply else history
                elif reply:
                    shown = history + list(reply)
                # the line only when it changes: a refusal written there meanwhile stays readable
                yield _chat(shown, True), line if line != stats else gr.skip(), gr.skip()
                stats = line
    except (InvalidRequest, BackendBusy) as error:   # refused when the stream began (too long, busy)
        if shown is history:
            yield given_back(str(error))
        else:
            yield _chat(mark(shown, "failed", lang, str(error)), True), \
                text("error", lang, error=translate_error(str(error), lang)), gr.skip()
    except Stopped:   # the generation was cancelled with the turn's stream (aclosing)
        waiting = stats.startswith("⏳")   # stopped while waiting for a slot: that line goes
        yield _chat(mark(shown, "stopped", lang), True), "" if waiting else gr.skip(), gr.skip()
    except Exception:
        log.exception("chat request failed")
        yield _chat(mark(shown, "failed", lang, text("server_error", lang)), True), \
            text("error", lang, error=text("server_error", lang)), gr.skip()


def finish(history):
    """After ``respond`` (or its refusal): Send is back, the chat not busy, the conversation stored as it ended."""
    return (gr.Chatbot(elem_classes=[]), *Controls.idle(), history if history else gr.skip())


def stopper(stops: StopSignals):
    async def stop(request: gr.Request):
        """Stop pressed: the running ``respond`` of this session ends its reply, marked stopped."""
        stops.request(getattr(request, "session_hash", None))

    return stop


def store_while_streaming(history, busy, lang):
    """What the browser keeps after each change of the chat: mid-reply, the reply marked interrupted (a reload
    then shows it so); an empty chat is never written (only Clear empties the stored conversation)."""
    if not history:
        return gr.skip()
    return while_streaming(history, lang) if busy else history


def clear(saved):
    """Clear pressed (Gradio has emptied the chat): keep the conversation so that it can be brought back."""
    return [], saved if saved else None, gr.Button(visible=bool(saved))


def undo_clear(cleared):
    if not cleared:
        return gr.skip(), gr.skip(), None, gr.Button(visible=False)
    return cleared, cleared, None, gr.Button(visible=False)
