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

Caps (besides ``documents.limits.LIMITS``: pages, characters, time, memory, bombs), each refused with a message
in the visitor's language: a file of at most PAGE_FILE_BYTES (what a request body takes once base64-encoded),
MAX_PENDING documents on one message, per browser session MAX_SESSION_DOCUMENTS documents and
MAX_SESSION_CHARS characters of text, per client address MAX_CLIENT_DOCUMENTS and MAX_CLIENT_CHARS held at
once and MAX_CLIENT_READS files read per READ_WINDOW_SECONDS, and MAX_TOTAL_CHARS for the whole server.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import html
import json
import logging
import secrets
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from chatglm_web.documents import AttachedDocument, DocumentError, extract
from chatglm_web.documents.document import KIND_NAMES
from chatglm_web.documents.limits import LIMITS, MB, mebibytes, megabytes
from chatglm_web.documents.prompt import NoRoom, frame, room, share_room, token_counter
from chatglm_web.documents.sniff import ACCEPTED, display_name
from chatglm_web.generation import InvalidRequest, SamplingParams
from chatglm_web.messages import plain_text
from chatglm_web.page.strings import text

log = logging.getLogger(__name__)

#: The largest file the page takes: a request body is at most 8 MiB (``api.http_guard``), and base64 makes
#: 4 bytes of 3, so 6 MB of file is 8,000,000 bytes sent, with room for the rest of the request.
PAGE_FILE_BYTES = min(LIMITS.file_bytes, 6 * MB)
MAX_PENDING = 4                   # documents on one message (as the API's files per request)
MAX_SESSION_DOCUMENTS = 8         # documents one browser session holds
MAX_SESSION_CHARS = 4_000_000     # characters of extracted text one browser session holds
MAX_CLIENT_DOCUMENTS = 16         # documents one client address holds, all its sessions together
MAX_CLIENT_CHARS = 8_000_000      # characters one client address holds
MAX_CLIENT_READS = 30             # files one client address may have read ...
READ_WINDOW_SECONDS = 600         # ... within this many seconds
MAX_TOTAL_CHARS = 64_000_000      # characters all sessions hold together (the server's memory bound)
IDLE_SECONDS = 6 * 3600           # a session not heard of for this long is dropped
MAX_TRACKED_CLIENTS = 10_000      # client addresses whose reads are remembered
DOCUMENTS_JS = Path(__file__).with_name("documents.js").read_text(encoding="utf-8")
ATTACH_JS = "(picked, ...rest) => [window.chatglmDocs.take(), ...rest]"
DETACH_JS = "(chosen, ...rest) => [window.chatglmDocs.removing, ...rest]"
#: The chip line in the chat (a user message of its own after the message's text).
CHIPS_CLASS = "doc-chips"
NOTE_CLASS = "doc-note"
#: Keys of a document reference in a conversation (what the tree keeps of a document).
REF_KEYS = ("id", "name", "kind", "pages", "chars", "tokens")

#: DocumentError reasons in Chinese ({name}, and the caps in force); English uses the reader's own message.
REASONS_ZH = {
    "unsupported": "{name}：不能附加这种文件；请附加 .txt、.md、.pdf、.docx 或 .html 文件。",
    "unreadable": "无法读取 {name}。",
    "too_large": "{name} 太大：文档的上限是 {file}。",
    "empty": "{name} 是空文件。",
    "wrong_type": "{name} 的内容与它的扩展名不符。",
    "not_text": "{name} 不是文本文件。",
    "encrypted": "{name} 已加密，无法读取。",
    "damaged": "{name} 已损坏，无法读取。",
    "pages": "{name} 超过了 {pages} 页的上限。",
    "chars": "{name} 的文字超过了 {chars:,} 个字符的上限。",
    "bomb": "{name} 没有被读取：它解压后远大于文件本身（压缩炸弹），超出了安全上限。",
    "time": "读取 {name} 超过了 {seconds:g} 秒的时间上限，已停止。",
    "memory": "读取 {name} 需要的内存超过了 {memory} 的上限，已停止。",
    "no_text": "{name} 中没有可读取的文字（扫描件需要先做文字识别）。",
    "crashed": "读取 {name} 时出错；文件可能已损坏。",
    "busy": "正在读取其他文档；请稍后再试。",
}


class Refusal(Exception):
    """An attachment refused; ``str()`` is the message in the visitor's language."""


@dataclass
class Held:
    id: str
    session: str
    client: str
    attached: AttachedDocument
    ref: dict


_STORES: weakref.WeakSet = weakref.WeakSet()   # every SessionDocuments of this process


def is_live(doc_id) -> bool:
    """Whether a session of this process still holds the document ``doc_id`` (how the chat draws its chip)."""
    return isinstance(doc_id, str) and any(store.live(doc_id) for store in list(_STORES))


class SessionDocuments:
    """The documents of every browser session, in memory, with the caps of the module docstring. Thread-safe
    (the page's steps run in threads and on the event loop)."""

    def __init__(self, count_tokens=None, *, clock=time.monotonic):
        _STORES.add(self)
        self.count_tokens = count_tokens
        self.clock = clock
        self._lock = threading.Lock()
        self._held: dict[str, Held] = {}
        self._sessions: dict[str, list[str]] = {}     # session -> its documents, in attaching order
        self._pending: dict[str, list[str]] = {}      # session -> documents not yet sent with a message
        self._seen: dict[str, float] = {}             # session -> when it was last heard of
        self._reads: dict[str, deque] = {}            # client -> when its recent reads began

    # -- reading ------------------------------------------------------------------------------------------------
    def get(self, session: str | None, doc_id: str) -> AttachedDocument | None:
        with self._lock:
            held = self._held.get(doc_id)
            if held is None or held.session != (session or ""):
                return None
            self._seen[held.session] = self.clock()
            return held.attached

    def live(self, doc_id: str) -> bool:
        """Whether some session here still holds the document (a chip of an earlier session's: no)."""
        with self._lock:
            return doc_id in self._held

    def pending(self, session: str | None) -> list[dict]:
        with self._lock:
            return [dict(self._held[i].ref) for i in self._pending.get(session or "", []) if i in self._held]

    def sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    def held_chars(self, session: str | None = None) -> int:
        with self._lock:
            return sum(h.ref["chars"] for h in self._held.values() if session is None or h.session == session)

    # -- changing -----------------------------------------------------------------------------------------------
    def attach(self, session: str | None, client: str | None, filename: str, data: bytes, lang: str) -> dict:
        """Read the file and keep it as a pending document of the session: its reference. ``Refusal``
        with the reason in ``lang`` otherwise. Blocking (a worker process, then tokenizing)."""
        session, client = session or "", client or ""
        name = display_name(filename or "document")
        self._expire()
        with self._lock:
            self._check_counts(session, client, name, lang)
            reads = self._reads.setdefault(client, deque())
            now = self.clock()
            while reads and reads[0] <= now - READ_WINDOW_SECONDS:
                reads.popleft()
            if len(reads) >= MAX_CLIENT_READS:
                raise Refusal(text("doc_too_many_reads", lang, count=MAX_CLIENT_READS,
                                   minutes=READ_WINDOW_SECONDS // 60))
            reads.append(now)
            while len(self._reads) > MAX_TRACKED_CLIENTS:
                self._reads.pop(next(iter(self._reads)))
        if len(data) > PAGE_FILE_BYTES:
            raise Refusal(text("doc_file_too_large", lang, name=name, size=megabytes(len(data)),
                               limit=megabytes(PAGE_FILE_BYTES)))
        try:
            document = extract(data, name)
        except DocumentError as error:
            raise Refusal(document_error(error, name, lang)) from None
        attached = AttachedDocument(document, self.count_tokens or token_counter(None)[0])
        tokens = attached.document_tokens
        ref = {"id": "d" + secrets.token_urlsafe(12), "name": document.name, "kind": document.kind,
               "pages": document.pages, "chars": document.chars, "tokens": tokens}
        with self._lock:   # the caps again: other reads may have finished meanwhile
            self._check_counts(session, client, name, lang, document.chars)
            self._held[ref["id"]] = Held(ref["id"], session, client, attached, ref)
            self._sessions.setdefault(session, []).append(ref["id"])
            self._pending.setdefault(session, []).append(ref["id"])
            self._seen[session] = self.clock()
        return dict(ref)

    def _check_counts(self, session: str, client: str, name: str, lang: str, chars: int = 0) -> None:
        mine = [self._held[i] for i in self._sessions.get(session, [])]
        theirs = [h for h in self._held.values() if client and h.client == client]
        if len(self._pending.get(session, [])) >= MAX_PENDING:
            raise Refusal(text("doc_too_many_pending", lang, count=MAX_PENDING))
        if len(mine) >= MAX_SESSION_DOCUMENTS:
            raise Refusal(text("doc_too_many_session", lang, count=MAX_SESSION_DOCUMENTS))
        if len(theirs) >= MAX_CLIENT_DOCUMENTS:
            raise Refusal(text("doc_too_many_client", lang, count=MAX_CLIENT_DOCUMENTS))
        if sum(h.ref["chars"] for h in mine) + chars > MAX_SESSION_CHARS:
            raise Refusal(text("doc_session_chars", lang, name=name, limit=MAX_SESSION_CHARS))
        if sum(h.ref["chars"] for h in theirs) + chars > MAX_CLIENT_CHARS:
            raise Refusal(text("doc_client_chars", lang, name=name, limit=MAX_CLIENT_CHARS))
        if sum(h.ref["chars"] for h in self._held.values()) + chars > MAX_TOTAL_CHARS:
            raise Refusal(text("doc_server_full", lang, name=name))

    def remove_pending(self, session: str | None, doc_id: str) -> bool:
        """The ✕ of a pending chip: the document is dropped (it was never sent)."""
        session = session or ""
        with self._lock:
            pending = self._pending.get(session, [])
            if doc_id not in pending:
                return False
            pending.remove(doc_id)
            self._drop(doc_id)
            return True

    def take_pending(self, session: str | None) -> list[dict]:
        """The pending documents, now sent with a message (they stay held for the session)."""
        session = session or ""
        with self._lock:
            ids = self._pending.pop(session, [])
            return [dict(self._held[i].ref) for i in ids if i in self._held]

    def give_back(self, session: str | None, refs: list[dict]) -> None:
        """Documents of a message that was not sent after all (given back to the box): pending again."""
        session = session or ""
        with self._lock:
            pending = self._pending.setdefault(session, [])
            for ref in refs or []:
                doc_id = ref.get("id") if isinstance(ref, dict) else None
                held = self._held.get(doc_id)
                if held is not None and held.session == session and doc_id not in pending \
                        and len(pending) < MAX_PENDING:
                    pending.append(doc_id)

    def end_session(self, session: str | None) -> int:
        """Drop every document of the session; how many there were."""
        session = session or ""
        with self._lock:
            ids = self._sessions.pop(session, [])
            for doc_id in ids:
                self._held.pop(doc_id, None)
            self._pending.pop(session, None)
            self._seen.pop(session, None)
            return len(ids)

    def _drop(self, doc_id: str) -> None:
        held = self._held.pop(doc_id, None)
        if held is not None:
            ids = self._sessions.get(held.session, [])
            if doc_id in ids:
                ids.remove(doc_id)
            if not ids:
                self._sessions.pop(held.session, None)

    def _expire(self) -> None:
        now = self.clock()
        with self._lock:
            idle = [s for s, seen in self._seen.items() if seen < now - IDLE_SECONDS]
        for session in idle:
            self.end_session(session)


def document_error(error: DocumentError, name: str, lang: str) -> str:
    """A reader's refusal in ``lang`` (English: its own message, which names the cap)."""
    if lang != "zh-CN" or error.reason not in REASONS_ZH:
        return str(error)
    return REASONS_ZH[error.reason].format(name=name, file=megabytes(PAGE_FILE_BYTES), pages=LIMITS.pages,
                                           chars=LIMITS.chars, seconds=LIMITS.seconds,
                                           memory=mebibytes(LIMITS.memory_bytes))


def decode_picked(picked) -> tuple[str, bytes]:
    """(file name, bytes) of what ``documents.js`` read; ``ValueError`` with the reason ("too_large" with the
    size, "unreadable", "bad") otherwise."""
    if not isinstance(picked, dict):
        raise ValueError("bad")  # noqa: TRY004  (a reason, as for the others)
    name = picked.get("name") if isinstance(picked.get("name"), str) else "document"
    if picked.get("error") == "too_large":
        raise ValueError("too_large")
    if picked.get("error") or not isinstance(picked.get("data"), str):
        raise ValueError("unreadable")
    data = picked["data"]
    if len(data) > PAGE_FILE_BYTES * 4 // 3 + 8:
        raise ValueError("too_large")
    try:
        return name, base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("unreadable") from None


# -- how documents look on the page ---------------------------------------------------------------------------

def describe(ref: dict, lang: str) -> str:
    """'report.pdf · PDF, 3 pages · 1,234 tokens'."""
    kind = text(f"doc_kind_{ref.get('kind')}", lang) if ref.get("kind") in KIND_NAMES else str(ref.get("kind", ""))
    pages = ref.get("pages")
    if isinstance(pages, int):
        kind = text("doc_kind_pages", lang, kind=kind, pages=pages)
    return text("doc_chip", lang, name=ref.get("name", ""), kind=kind, tokens=int(ref.get("tokens") or 0))


def chip(ref: dict, lang: str, *, live: bool = True, removable: bool = False) -> str:
    words = html.escape(describe(ref, lang))
    extra = ""
    if not live:
        extra = f' <span class="doc-gone">{html.escape(text("doc_attach_again", lang))}</span>'
    remove = ""
    if removable:
        label = html.escape(text("doc_remove", lang, name=ref.get("name", "")))
        remove = (f' <button type="button" class="chip-remove" data-doc="{html.escape(str(ref.get("id", "")))}" '
                  f'aria-label="{label}" title="{label}">✕</button>')
    return f'<span class="doc-chip">📄 {words}{extra}{remove}</span>'


def pending_html(refs: list[dict], lang: str) -> str:
    if not refs:
        return ""
    chips = " ".join(chip(ref, lang, removable=True) for ref in refs)
    note = html.escape(text("doc_pending_note", lang))
    return f'<div class="doc-pending">{chips} <span class="doc-pending-note">{note}</span></div>'


def chips_message(refs: list[dict], lang: str, live=None, *, plain: bool = False) -> dict:
    """The chat's message under a message with documents: a chip each (``live(id)``: still held). ``plain``:
    as text (a download), one line a document."""
    if plain:
        return {"role": "user", "content": "\n".join(f"📄 {describe(ref, lang)}" for ref in refs)}
    chips = " ".join(chip(ref, lang, live=live(ref.get("id")) if live else True) for ref in refs)
    return {"role": "user", "content": f'<span class="{CHIPS_CLASS}">{chips}</span>'}


def refs_of(message: dict) -> list[dict]:
    refs = message.get("documents") if isinstance(message, dict) else None
    return [r for r in refs if isinstance(r, dict)] if isinstance(refs, list) else []


def report_of(generation: dict) -> list[dict]:
    raw = generation.get("documents") if isinstance(generation, dict) else None
    try:
        found = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        return []
    return [r for r in found if isinstance(r, dict)] if isinstance(found, list) else []


def note_line(entry: dict, lang: str) -> str:
    name = str(entry.get("name", ""))
    mode = entry.get("mode")
    if mode == "whole":
        line = text("doc_whole", lang, name=name, tokens=int(entry.get("included_tokens") or 0))
    elif mode == "passages":
        total = int(entry.get("total_tokens") or 0)
        included = int(entry.get("included_tokens") or 0)
        line = text("doc_passages", lang, name=name, count=int(entry.get("passages") or 0), included=included,
                    total=total, share=f"{included / total:.0%}" if total else "0%")
    elif mode == "left_out":
        line = text("doc_left_out", lang, name=name)
    else:
        line = text("doc_missing", lang, name=name)
    if entry.get("suggested_model"):
        line += text("doc_suggest", lang, model=str(entry["suggested_model"]))
    return line


def note_message(report: list[dict], lang: str, *, plain: bool = False) -> dict | None:
    """The line under a reply saying what of its documents the model saw (``plain``: as text)."""
    if not report:
        return None
    if plain:
        return {"role": "assistant", "content": "\n".join(note_line(entry, lang) for entry in report)}
    lines = "<br>".join(html.escape(note_line(entry, lang)) for entry in report)
    return {"role": "assistant", "content": f'<span class="{NOTE_CLASS}">{lines}</span>'}


# -- documents into the prompt --------------------------------------------------------------------------------

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


def button_html(lang: str) -> str:
    """The 📎 button: a real button with an accessible name (``documents.js`` opens the file picker)."""
    accepted = ".txt、.md、.pdf、.docx 或 .html" if lang == "zh-CN" else ACCEPTED
    label = html.escape(text("doc_attach", lang, accepted=accepted, limit=megabytes(PAGE_FILE_BYTES),
                             pages=LIMITS.pages, chars=LIMITS.chars))
    accept = ".txt,.md,.markdown,.pdf,.docx,.html,.htm"
    return (f'<button type="button" class="attach-button" aria-label="{label}" title="{label}" '
            f'data-accept="{accept}" data-limit="{PAGE_FILE_BYTES}">📎</button>')
