"""The documents of every browser session, held in this process's memory, with their caps.

``SessionDocuments.attach`` reads a file (``documents.extract``: a limited worker process), keeps its text for
the session as a pending document and returns its reference ({id, name, kind, pages, chars, tokens}); a
message takes the pending ones (``take_pending``); Undo gives them back (``give_back``); the session's end
drops them (``end_session``; a session idle for IDLE_SECONDS is dropped too). ``is_live(id)``: whether any
session here still holds a document (a chip of an earlier session's is not).

Caps (besides ``documents.limits.LIMITS``: pages, characters, time, memory, bombs), each refused with a
``Refusal`` in the visitor's language: a file of at most PAGE_FILE_BYTES (what a request body takes once
base64-encoded), MAX_PENDING documents on one message, per browser session MAX_SESSION_DOCUMENTS documents
and MAX_SESSION_CHARS characters of text, per client address MAX_CLIENT_DOCUMENTS and MAX_CLIENT_CHARS held
at once and MAX_CLIENT_READS files read per READ_WINDOW_SECONDS, and MAX_TOTAL_CHARS for the whole server.
"""

from __future__ import annotations

import base64
import binascii
import secrets
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass

from chatglm_web.documents import AttachedDocument, DocumentError, extract
from chatglm_web.documents.limits import LIMITS, MB, mebibytes, megabytes
from chatglm_web.documents.prompt import token_counter
from chatglm_web.documents.sniff import display_name
from chatglm_web.page.strings import text

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
