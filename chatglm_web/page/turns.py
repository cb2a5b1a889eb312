"""The page's turn controls: send, stop, retry, undo, edit and the version links, as plain functions on the
tab's conversation tree (``conversations/tree.py``), which is the truth: the chat shows it (``view``).

Every way to start a reply goes through the same four steps (wired in ``layout.py``)::

    begin   (no queue)  checks the message; outputs only the plan State, so a refusal marks nothing
                        visible (``.failure`` then writes the reason in the statistics line)
    show    (no queue)  adds the message (on Edit a new version of it) and an empty reply (on Retry a new
                        version of the reply) to the tree; shows it, switches Send to Stop
    respond (queued)    streams the reply into the tree and the chat, and the statistics line
    finish  (no queue)  switches Stop back to Send; the page then stores the conversation

``stop`` asks the running ``respond`` of its browser session (whatever started it) to stop: ``respond``
ends the generation, marks the reply stopped and returns, and ``finish`` runs as after any reply (no
event cancellation, whose late chunks could overwrite the marked reply). While the chat is busy
Retry, Undo and Edit do nothing and look disabled (the ``busy`` class). An error never shows twice: it
is written in the statistics line only; a turn that failed before any text is taken back out of the tree
(a new message returns to the input box), one that failed mid-reply keeps the text, marked failed.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections import OrderedDict
from contextlib import aclosing, suppress

import gradio as gr

from chatglm_web.messages import plain_text
from chatglm_web.generation import BackendBusy, Finished, InvalidRequest
from chatglm_web.conversations.tree import Conversation
from chatglm_web.page.chat import check_text, printable, seed_value, start_turn
from chatglm_web.page.conversation_view import navigate, node_at, view
from chatglm_web.page.strings import text, translate_error

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


def chat_update(tree: Conversation | None, lang: str, busy: bool, streaming: str | None = None):
    """(the chat, which node each of its messages shows) for ``tree``; ``streaming``: the reply being written
    (shown without its "interrupted" marker, which is only for storage)."""
    messages, shown = view(tree, lang, streaming)
    return gr.update(value=messages, elem_classes=[BUSY_CLASS] if busy else []), shown


def _accept(message, lang: str, refusals: Refusals, request) -> str:
    """The message to answer; ``Refused`` (the chain stops, the reason goes to the statistics line) otherwise."""
    message = plain_text(message) if message is not None else ""
    if not message.strip():
        raise refusals.refuse(request, text("empty_message", lang))
    try:
        check_text(message, None, None)
    except InvalidRequest as error:
        raise refusals.refuse(request, translate_error(str(error), lang)) from None
    return message


class Begin:
    """The first step of every way to start a turn: outputs only the ``plan`` State, so that a refusal, raised
    as an error, marks nothing visible; ``show`` follows when it succeeded. A plan is ``{"parent": node,
    "text": message}`` (a new message, or on Edit a new version of one) or ``{"user": node}`` (Retry: a new
    version of the reply to that message)."""

    def __init__(self, refusals: Refusals):
        self.refusals = refusals

    def _idle(self, busy, readonly, lang, request, tree=True) -> None:
        if tree is None:   # the page has not finished loading its conversation
            raise self.refusals.refuse(request, text("busy_now", lang))
        if readonly:
            raise self.refusals.refuse(request, text("read_only", lang))
        if busy:
            raise self.refusals.refuse(request, text("busy_now", lang))

    def _after_last(self, tree: Conversation) -> str:
        last = tree.last()
        return last.parent if last.role == "user" else last.id   # (a message without a reply: a new version)

    def send(self, message, tree, busy, readonly, lang, request: gr.Request):
        self._idle(busy, readonly, lang, request, tree)
        return {"parent": self._after_last(tree), "text": _accept(message, lang, self.refusals, request)}

    def example(self, tree, busy, readonly, lang, selected: gr.SelectData, request: gr.Request):
        self._idle(busy, readonly, lang, request, tree)
        value = selected.value
        message = _accept(value.get("text") if isinstance(value, dict) else value, lang, self.refusals, request)
        return {"parent": self._after_last(tree), "text": message}

    def retry(self, tree, shown, busy, readonly, lang, retry: gr.RetryData, request: gr.Request):
        """A new version of the reply to the message Retry was pressed on (the earlier one is kept)."""
        self._idle(busy, readonly, lang, request, tree)
        node_id = node_at(tree, shown, retry.index)
        if node_id is None or tree.nodes[node_id].role not in ("user", "assistant"):
            raise self.refusals.refuse(request, text("nothing_to_retry", lang))
        node = tree.nodes[node_id]
        return {"user": node.id if node.role == "user" else node.parent}

    def edit(self, tree, shown, busy, readonly, lang, edit: gr.EditData, request: gr.Request):
        """A new version of the edited message, answered; the earlier version and its replies are kept."""
        self._idle(busy, readonly, lang, request, tree)
        node_id = node_at(tree, shown, edit.index)
        # (a user node shows its message first; its version links follow under the same node)
        if node_id is None or tree.nodes[node_id].role != "user" or shown.index(node_id) != edit.index:
            raise self.refusals.refuse(request, text("not_editable", lang))
        documents = tree.nodes[node_id].messages[0].get("documents")   # the new version keeps its documents
        return {"parent": tree.nodes[node_id].parent, "text": _accept(edit.value, lang, self.refusals, request),
                **({"documents": documents} if documents else {})}

    def refused(self, lang, request: gr.Request):
        """The failure step after a refused begin: the reason, once, in the statistics line."""
        return text("error", lang, error=self.refusals.pop(request) or text("server_error", lang))


def generation_settings(system_prompt, temperature, top_p, max_new_tokens, top_k, repetition_penalty, seed, mode,
                        info=None) -> dict:
    """What a reply is generated with, kept with it (a share link carries it; Replay uses it). A random seed
    (-1) is drawn here, so that the seed actually used is known."""
    seed = seed_value(seed)
    if seed is None:
        seed = secrets.randbelow(2**31)
    settings = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "top_k": top_k,
                "repetition_penalty": repetition_penalty, "seed": seed, "mode": mode,
                "system_prompt": system_prompt or ""}
    if info is not None:
        settings.update(model=info.name, precision=info.precision)
    return settings


def show(plan, tree: Conversation, lang, system_prompt, temperature, top_p, max_new_tokens, top_k,
         repetition_penalty, seed, mode, info=None, documents=None, request: gr.Request = None):
    """The accepted turn on the page: the message in the chat, the box emptied, Stop instead of Send; the tree
    gets the message (or its new version) and an empty reply. Outputs (chatbot, shown, textbox, stats, plan,
    busy, send, stop), and with ``documents`` (``attachments.PageDocuments``) the pending chips, emptied: a new
    message takes the pending documents (an edited one keeps its own)."""
    settings = (system_prompt, temperature, top_p, max_new_tokens, top_k, repetition_penalty, seed, mode)
    if "text" in plan:
        refs = plan.get("documents")
        if refs is None and documents is not None:
            refs = documents.take(request)
        user = tree.add_user(plan["parent"], plan["text"], refs)
    else:
        user = tree.nodes[plan["user"]]
    reply = tree.add_reply(user.id, generation_settings(*settings, info=info))
    plan = {**plan, "user_node": user.id, "reply": reply.id}
    chat, shown = chat_update(tree, lang, True, reply.id)
    pending = (documents.relabel(lang, request),) if documents is not None else ()
    return (chat, shown, gr.Textbox(value=""), "", plan, *Controls.running(), *pending)


def undo(tree, shown, busy, readonly, lang, undone: gr.UndoData, documents=None, request: gr.Request = None):
    """Take back the last exchange shown: its message returns to the input box (other versions stay), and with
    ``documents`` (``attachments.PageDocuments``) its documents to the pending chips. Nothing while a reply
    streams. Outputs (chatbot, shown, textbox), and with ``documents`` the pending chips."""
    pending = () if documents is None else (gr.skip(),)
    node_id = node_at(tree, shown, undone.index)
    if busy or readonly or node_id is None:
        return gr.skip(), gr.skip(), gr.skip(), *pending
    node = tree.nodes[node_id]
    if node.role == "assistant":
        node = tree.nodes[node.parent]
    message = node.messages[0]["content"]
    refs = node.messages[0].get("documents")
    tree.remove(node.id)
    if documents is not None:
        if refs:
            documents.give_back(request, refs)
        pending = (documents.relabel(lang, request),)
    chat, shown = chat_update(tree, lang, False)
    return chat, shown, gr.Textbox(value=printable(plain_text(message))), *pending


def navigate_versions(request, tree, busy, lang):
    """A ‹ or › of a message with versions: show that version (and the branch after it). Outputs (chatbot,
    shown)."""
    if busy or not navigate(tree, request):
        return gr.skip(), gr.skip()
    return chat_update(tree, lang, False)


async def respond(plan, tree: Conversation, system_prompt, temperature, top_p, max_new_tokens, top_k,
                  repetition_penalty, seed, mode, lang, toolbox=None, backend=None,
                  stops: StopSignals | None = None, request: gr.Request | None = None, documents=None):
    """(chatbot, shown, stats, textbox) updates of the reply ``show`` added to the tree; ``documents``
    (``attachments.PageDocuments``) puts the branch's documents into the prompt."""
    if not plan or "reply" not in plan:   # begin refused it
        yield gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return
    session = getattr(request, "session_hash", None)
    stops = stops if stops is not None else StopSignals()
    stop = stops.watch(session)
    try:
        async for update in _respond(plan, tree, system_prompt, temperature, top_p, max_new_tokens, top_k,
                                     repetition_penalty, mode, lang, toolbox, backend, stop, request,
                                     documents):
            yield update
    finally:
        stops.done(session)


async def _respond(plan, tree, system_prompt, temperature, top_p, max_new_tokens, top_k, repetition_penalty, mode,
                   lang, toolbox, backend, stop: asyncio.Event, request, documents=None):
    reply_id, user_id = plan["reply"], plan["user_node"]
    user = tree.nodes[user_id]
    path = [node.id for node in tree.path()]
    history = [m for node_id in path[:path.index(user_id)] for m in tree.nodes[node_id].messages]
    message = user.messages[0]["content"]
    seed = tree.nodes[reply_id].generation.get("seed")

    def update(stats=gr.skip(), box=gr.skip(), streaming=True):
        chat, shown = chat_update(tree, lang, True, reply_id if streaming else None)
        return chat, shown, stats, box

    def given_back(error: str):
        """Nothing came: the turn is taken back (a new message returns to the input box)."""
        if reply_id in tree.nodes:
            refs = tree.nodes[user_id].messages[0].get("documents")
            if "text" in plan and refs and documents is not None and "documents" not in plan:
                documents.give_back(request, refs)   # pending again, with the message back in the box
            tree.remove(user_id if "text" in plan else reply_id)
        return update(text("error", lang, error=translate_error(error, lang)),
                      gr.Textbox(value=plan["text"]) if "text" in plan else gr.skip(), False)

    def ended(end, error=""):
        tree.set_reply(reply_id, tree.nodes[reply_id].messages, end, error)

    try:
        if documents is not None:   # the branch's documents into their messages (the chat shows them as chips)
            history, message = await documents.compose(
                tree, user_id, reply_id, history, message, system_prompt, mode,
                {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "top_k": top_k,
                 "repetition_penalty": repetition_penalty, "seed": seed}, lang, request)
        turn = await start_turn(backend, toolbox, message, history, system_prompt, mode, request, lang,
                                temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, top_k=top_k,
                                repetition_penalty=repetition_penalty, seed=seed)
    except (InvalidRequest, BackendBusy) as error:
        yield given_back(str(error))
        return
    except Exception:
        log.exception("chat request failed")
        yield given_back(text("server_error", lang))
        return
    got, stats = False, ""
    try:
        async with aclosing(turn) as updates:
            async for event in _until_stopped(updates, stop):
                if isinstance(event, Finished):
                    if event.reason == "error":
                        if not got:   # nothing came: the message goes back to the box
                            yield given_back(text("generation_failed", "en", error=event.error))
                            return
                        ended("failed", event.error)
                        yield update(text("error", lang, error=text("generation_failed", lang,
                                                                      error=translate_error(event.error, lang))),
                                     streaming=False)
                        return
                    ended("length" if event.reason == "length" else None)
                    continue
                reply, line = event
                if isinstance(reply, str):
                    messages = [{"role": "assistant", "content": reply}] if reply else []
                else:
                    messages = [dict(m) for m in reply]
                if messages:
                    got = True
                    tree.set_reply(reply_id, messages, "interrupted")
                # the line only when it changes: a refusal written there meanwhile stays readable
                yield update(line if line != stats else gr.skip())
                stats = line
        if tree.nodes[reply_id].end == "interrupted":   # the stream ended without its Finished
            ended(None)
        yield update(streaming=False)
    except (InvalidRequest, BackendBusy) as error:   # refused when the stream began (too long, busy)
        if not got:
            yield given_back(str(error))
        else:
            ended("failed", str(error))
            yield update(text("error", lang, error=translate_error(str(error), lang)), streaming=False)
    except Stopped:   # the generation was cancelled with the turn's stream (aclosing)
        ended("stopped")
        waiting = stats.startswith("⏳")   # stopped while waiting for a slot: that line goes
        yield update("" if waiting else gr.skip(), streaming=False)
    except Exception:
        log.exception("chat request failed")
        ended("failed", text("server_error", lang))
        yield update(text("error", lang, error=text("server_error", lang)), streaming=False)


def finish(tree, lang):
    """After ``respond`` (or its refusal): Send is back, the chat not busy. Outputs (chatbot, shown, busy, send,
    stop); the page stores the conversation next."""
    chat, shown = chat_update(tree, lang, False)
    return (chat, shown, *Controls.idle())


def stopper(stops: StopSignals):
    async def stop(request: gr.Request):
        """Stop pressed: the running ``respond`` of this session ends its reply, marked stopped."""
        stops.request(getattr(request, "session_hash", None))

    return stop
