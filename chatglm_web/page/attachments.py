"""Chat with a document on the page: attach a file to a message, see it as a chip, ask about it.

    📎 (``#attach``)  the browser picks a file and reads it itself (FileReader, base64: ``documents.js``), then
                     a hidden button (``#attach-go``) sends {name, size, data} as a plain string in an event;
                     Gradio's upload route stays refused, and no file is written to the server's disk by the
                     page (the documents package's reader hands the bytes to its worker process in temporary
                     files it deletes at once)
    attach           ``documents.extract`` in its limited worker process (off the event loop), then the text
                     is kept in this process's memory for the browser session (``SessionDocuments``) and shown
                     as a pending chip above the message box (✕ removes it: ``#detach-go``)
    show             Send takes the pending documents onto the new message: the tree's user message keeps
                     references only ({id, name, kind, pages, chars, tokens}), the text stays here
    compose          before each reply, every document on the conversation's shown branch that this session
                     still holds goes into its user message (``documents.prompt``): whole when it fits the
                     room the conversation leaves, else the passages most relevant to the question (BM25);
                     the reply keeps what happened (``generation["documents"]``, JSON) and the chat says it
                     under the reply, with a longer-context model for a document far over the room
    end_session      the tab closed (Gradio's unload): the session's documents are dropped. A session idle for
                     IDLE_SECONDS is dropped too (in case no unload ever comes)

A stored conversation reopened in a later session still shows its chips; the page says the document must be
attached again (``live``), and a reply made without it says so too.

The session store and its caps are ``document_store``; how documents look, ``document_chips``.

Caps (besides ``documents.limits.LIMITS``: pages, characters, time, memory, bombs), each refused with a message
in the visitor's language: a file of at most PAGE_FILE_BYTES (what a request body takes once base64-encoded),
MAX_PENDING documents on one message, per browser session MAX_SESSION_DOCUMENTS documents and
MAX_SESSION_CHARS characters of text, per client address MAX_CLIENT_DOCUMENTS and MAX_CLIENT_CHARS held at
once and MAX_CLIENT_READS files read per READ_WINDOW_SECONDS, and MAX_TOTAL_CHARS for the whole server.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path

import gradio as gr

from chatglm_web.documents import AttachedDocument
from chatglm_web.documents.limits import megabytes
from chatglm_web.documents.prompt import NoRoom, frame, room, share_room, token_counter
from chatglm_web.documents.sniff import display_name
from chatglm_web.generation import InvalidRequest, SamplingParams
from chatglm_web.messages import plain_text
from chatglm_web.page.document_chips import pending_html, refs_of
from chatglm_web.page.document_store import PAGE_FILE_BYTES, Refusal, SessionDocuments, decode_picked
from chatglm_web.page.strings import text

log = logging.getLogger(__name__)

DOCUMENTS_JS = Path(__file__).with_name("documents.js").read_text(encoding="utf-8")
ATTACH_JS = "(picked, ...rest) => [window.chatglmDocs.take(), ...rest]"
DETACH_JS = "(chosen, ...rest) => [window.chatglmDocs.removing, ...rest]"


def compose(store: SessionDocuments, backend, session: str | None, tree, user_id: str, reply_id: str,
            history: list[dict], message: str, system_prompt, system_message: dict | None, sampling: dict,
            lang: str, conversation) -> tuple[list[dict], str]:
    """(history, message) with the documents of the shown branch up to ``user_id`` framed into their user
    messages; what happened goes into the reply's ``generation["documents"]``. Unchanged when the branch has
    no documents. ``conversation(system_prompt, history, message, system_message)`` builds the model's
    messages (``chat.conversation``). ``InvalidRequest`` (in ``lang``) when there is no room. Blocking."""
    path = [node for node in tree.path()]
    ids = [node.id for node in path]
    if user_id not in ids:
        return history, message
    upto = path[:ids.index(user_id) + 1]
    with_docs = [node for node in upto if node.role == "user" and refs_of(node.messages[0])]
    if not with_docs:
        return history, message
    report: dict[str, dict] = {}
    held: dict[str, list[tuple[dict, AttachedDocument]]] = {}
    for node in with_docs:
        for ref in refs_of(node.messages[0]):
            attached = store.get(session, str(ref.get("id")))
            if attached is None:
                report[str(ref.get("id"))] = {"name": ref.get("name", ""), "mode": "missing"}
            else:
                held.setdefault(node.id, []).append((ref, attached))
    params = SamplingParams.from_form(**sampling)
    exact = token_counter(backend)[1]

    def framed_history(blocks: dict[str, list[str]], start: int = 0) -> tuple[list[dict], str]:
        """(history from ``upto[start]`` on, message), each node's blocks framed into its user message."""
        out = []
        for node in upto[start:-1]:
            for m in node.messages:
                if node.id in blocks and m is node.messages[0]:
                    out.append({"role": "user", "content": frame(blocks[node.id], plain_text(m.get("content")))})
                else:
                    out.append(m)
        return out, (frame(blocks[user_id], message) if user_id in blocks else message)

    def messages_from(start: int, blocks: dict[str, list[str]]) -> list[dict]:
        return conversation(system_prompt, *framed_history(blocks, start), system_message)

    start, preview = None, None
    for node in with_docs:
        if node.id not in held:
            continue
        index = upto.index(node)
        empty = {n.id: [""] * len(held[n.id]) for n in with_docs if n.id in held and upto.index(n) >= index}
        preview = backend.preview(messages_from(index, empty), params)
        if preview.dropped_messages == 0:
            start = index
            break
    items, owners = [], []
    for node in with_docs:
        if node.id not in held:
            continue
        for ref, attached in held[node.id]:
            if start is None or upto.index(node) < start:
                report[str(ref.get("id"))] = {"name": ref.get("name", ""), "mode": "left_out"}
                continue
            own = plain_text(node.messages[0].get("content"))
            question = message if node.id == user_id else f"{message}\n{own}"
            items.append((attached, question))
            owners.append((node.id, ref))
    blocks: dict[str, list[str]] = {}
    if items:
        try:
            fitted = share_room(items, room(preview, exact))
        except NoRoom as error:
            raise InvalidRequest(text("doc_no_room", lang, name=error.name, budget=preview.budget,
                                      context=preview.context_length, total=preview.total)) from None
        for (node_id, ref), result in zip(owners, fitted):
            blocks.setdefault(node_id, []).append(result.block)
            report[str(ref.get("id"))] = {"name": ref.get("name", ""), "mode": result.mode,
                                          "included_tokens": result.included_tokens,
                                          "total_tokens": result.total_tokens, "passages": len(result.passages),
                                          "suggested_model": result.suggested_model}
    history, message = framed_history(blocks)
    max_chars = getattr(backend, "max_input_chars", None)
    for content in [message] + [m["content"] for m in history if isinstance(m.get("content"), str)]:
        if max_chars and len(content) > max_chars and "<document>" in content:
            raise InvalidRequest(text("doc_too_many_chars", lang, chars=len(content), limit=max_chars))
    order = [str(ref.get("id")) for node in with_docs for ref in refs_of(node.messages[0])]
    if reply_id in tree.nodes:
        tree.nodes[reply_id].generation["documents"] = json.dumps([report[i] for i in order if i in report],
                                                                  ensure_ascii=False)
    return history, message


def preview_turn(store: SessionDocuments, backend, session: str | None, tree, message: str, system_prompt,
                 system_message: dict | None, sampling: dict, lang: str, conversation) -> tuple[list[dict], str] | None:
    """(history, message) as the next turn would send them, its documents in (the pending ones with the
    message), for the meter and "What the model sees"; None when there are no documents. Blocking."""
    from chatglm_web.conversations.tree import Conversation

    pending = store.pending(session)
    branch = tree.path() if tree is not None else []
    if not pending and not any(node.role == "user" and refs_of(node.messages[0]) for node in branch):
        return None
    copy = Conversation.from_dict(tree.to_dict()) if tree is not None else Conversation()
    last = copy.last()
    user = copy.add_user(last.parent if last.role == "user" else last.id, message, pending)
    history = [m for node in copy.path()[:-1] for m in node.messages]
    return compose(store, backend, session, copy, user.id, "", history, message, system_prompt, system_message,
                   sampling, lang, conversation)


class PageDocuments:
    """The page's document steps, bound to one ``SessionDocuments`` and the backend (wired in ``layout``)."""

    def __init__(self, backend, toolbox=None):
        self.store = SessionDocuments(token_counter(backend)[0])
        self.backend, self.toolbox = backend, toolbox

    async def attach(self, picked, lang, request: gr.Request = None):
        """``#attach-go``: read the picked file. Outputs (pending chips, statistics line)."""
        session = getattr(request, "session_hash", None)
        client = getattr(getattr(request, "client", None), "host", None)
        if picked is None:
            return pending_html(self.store.pending(session), lang), ""
        try:
            name, data = decode_picked(picked)
        except ValueError as error:
            name = display_name(str(picked.get("name") or "document")) if isinstance(picked, dict) else "document"
            if str(error) == "too_large":
                size = picked.get("size") if isinstance(picked, dict) and isinstance(picked.get("size"), int) else 0
                message = text("doc_file_too_large", lang, name=name, size=megabytes(size),
                               limit=megabytes(PAGE_FILE_BYTES))
            else:
                message = text("doc_unreadable", lang, name=name)
            return pending_html(self.store.pending(session), lang), text("error", lang, error=message)
        try:
            await asyncio.to_thread(self.store.attach, session, client, name, data, lang)
        except Refusal as refusal:
            return pending_html(self.store.pending(session), lang), text("error", lang, error=str(refusal))
        except Exception:
            log.exception("attaching a document failed")
            return pending_html(self.store.pending(session), lang), text("error", lang,
                                                                          error=text("server_error", lang))
        return pending_html(self.store.pending(session), lang), ""

    def detach(self, doc_id, lang, request: gr.Request = None):
        """``#detach-go``: a pending chip's ✕. Outputs (pending chips)."""
        session = getattr(request, "session_hash", None)
        if isinstance(doc_id, str):
            self.store.remove_pending(session, doc_id)
        return pending_html(self.store.pending(session), lang)

    def relabel(self, lang, request: gr.Request = None):
        return pending_html(self.store.pending(getattr(request, "session_hash", None)), lang)

    def take(self, request) -> list[dict]:
        return self.store.take_pending(getattr(request, "session_hash", None))

    def give_back(self, request, refs) -> None:
        self.store.give_back(getattr(request, "session_hash", None), refs)

    def end_session(self, request: gr.Request = None):
        dropped = self.store.end_session(getattr(request, "session_hash", None))
        if dropped:
            log.info("dropped the %d document(s) of a closed session", dropped)

    def preview(self, tree, message, system_prompt, mode, sampling, lang, request):
        """``preview_turn`` for the meter (blocking: the meter runs it in a thread)."""
        from chatglm_web.page.chat import conversation, seed_value
        from chatglm_web.page.meter import mode_system_message

        sampling = {**sampling, "seed": seed_value(sampling.get("seed"))}
        return preview_turn(self.store, self.backend, getattr(request, "session_hash", None), tree, message,
                            system_prompt, mode_system_message(self.toolbox, mode), sampling, lang, conversation)

    async def compose(self, tree, user_id, reply_id, history, message, system_prompt, mode, sampling, lang,
                      request: gr.Request = None):
        from chatglm_web.page.chat import conversation, seed_value
        from chatglm_web.page.meter import mode_system_message

        sampling = {**sampling, "seed": seed_value(sampling.get("seed"))}
        return await asyncio.to_thread(compose, self.store, self.backend, getattr(request, "session_hash", None),
                                       tree, user_id, reply_id, history, message, system_prompt,
                                       mode_system_message(self.toolbox, mode), sampling, lang, conversation)
