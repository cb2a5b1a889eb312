"""Documents through ``/v1/chat/completions``: OpenAI's ``file`` content parts, read and fitted into the prompt.

In: a user message's ``content`` may hold, next to its text parts, parts in OpenAI's format::

    {"type": "file", "file": {"filename": "report.pdf", "file_data": "data:application/pdf;base64,JVBERi0..."}}

``file_data`` is a ``data:`` URL with ``;base64``, or plain base64 (then ``filename`` is needed: its extension
says the kind). Without ``filename`` a data URL's media type names the kind (``document.pdf``). A file is at
most what fits in the request body (``http_guard.body_limit()``: 8 MiB by default, so about 6 MB of file
after base64) and what ``documents.limits`` allows. At most ``MAX_FILES`` files per request; a file part in
any message but a user's, a ``file_id`` (there is no Files API here), a missing name or bad base64 is a 400
naming the part (``messages[i].content[j]``).

Each file is read with ``documents.extract`` in a worker thread (it waits on a limited worker process):
its ``DocumentError`` is a 400 with its message, except "busy" (other documents are being read), a 429.
What of it goes into the prompt is ``AttachedDocument.fit(question, room)``, the question being its
message's text: the whole text when it fits, else the passages most relevant to the question.

The room. ``backend.preview()`` of the conversation with each document's frame but none of its text says
how many prompt tokens it takes (``total``) and may take (``budget``: the context less room for the
reply); ``room = budget - total`` less a margin for the tokenizer's joins (``MARGIN_TOKENS`` +
``MARGIN_SHARE``; ``ESTIMATE_MARGIN_SHARE`` when tokens are only estimated, see ``token_counter``). The
documents have priority over older turns: that preview starts at the earliest message with a document
(after the system message), so earlier turns are dropped, as for any long conversation, to make room.
When the turns after a document do not leave it in the context either, that document is left out (not
read) and the report says so. The room is shared among the documents smallest first, each getting an
equal share of what the ones before it left. No room at all, or not even one passage of a document in its
share, is a 400 saying so; so is a message that its documents make longer than the server's character limit
for one message (``--max-input-chars``).

Each document's block (``fitted.block``: its name and kind, then its text or passages with page marks) goes
into its user message before the question, between ``<document>`` and ``</document>`` lines; the message
becomes plain text and the rest of the pipeline is unchanged.

Out: ``Attached.report``, the response's non-standard ``documents`` field (also on the first streamed
chunk), one entry per file part in request order::

    {"filename": "report.pdf", "mode": "whole" | "passages" | "left_out",
     "included_tokens": 812, "total_tokens": 15230, "suggested_model": "THUDM/chatglm3-6b-32k" | null}

(``total_tokens`` is null for a document left out, which is not read.) The official ``openai`` client
keeps unknown fields (``completion.documents`` / ``completion.model_extra["documents"]``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from chatglm_web.api.tool_calls import model_messages
from chatglm_web.documents import AttachedDocument, Document, DocumentError, FittedDocument, extract
from chatglm_web.documents.prompt import (CLOSE, COUNT_PIECE_CHARS, ESTIMATE_MARGIN_SHARE, MARGIN_SHARE,  # noqa: F401
                                          MARGIN_TOKENS, MIN_ROOM_TOKENS, OPEN, NoRoom, first_kept, frame, framed, room,
                                          share_room, token_counter)
from chatglm_web.documents.sniff import ACCEPTED, display_name
from chatglm_web.generation import BackendBusy, InvalidRequest, PromptPreview, SamplingParams
from chatglm_web.messages import plain_text

MAX_FILES = 4                 # file parts in one request
# (the room, the margins, the frame and the token counter are documents.prompt's, shared with the page)
LEFT_OUT = "left_out"
#: the kind a data URL's media type names, for a file part without a filename
MEDIA_EXTENSIONS = {
    "application/pdf": ".pdf",
    "application/vnd.openxmlformats-officedocument.wordprocessingml.document": ".docx",
    "text/plain": ".txt",
    "text/markdown": ".md",
    "text/html": ".html",
}


@dataclass(frozen=True, eq=False)
class FilePart:
    """One decoded file part: its message's and its own index in the request, the file's name and bytes.
    Compared and hashed by identity (its bytes may be megabytes)."""

    message: int
    part: int
    filename: str
    data: bytes

    @property
    def where(self) -> str:
        return f"messages[{self.message}].content[{self.part}]"

    @property
    def param(self) -> str:
        return f"messages.{self.message}.content.{self.part}"


@dataclass(frozen=True)
class Attached:
    """The request's messages for the model with the documents in them, and what the response reports of them."""

    messages: list[dict]
    report: list[dict]


def file_parts(messages: Sequence[dict]) -> list[FilePart]:
    """The request's file parts, decoded, in order; ``InvalidRequest`` naming the part for one not taken.
    CPU work proportional to the files (base64): run it off the event loop."""
    found = [(i, j, part) for i, message in enumerate(messages) if isinstance(message.get("content"), list)
             for j, part in enumerate(message["content"]) if isinstance(part, dict) and part.get("type") == "file"]
    if len(found) > MAX_FILES:
        raise InvalidRequest(f"At most {MAX_FILES} files are taken in one request, got {len(found)}; send the "
                             "others in later messages.", param="messages")
    parts = []
    for i, j, part in found:
        role = messages[i].get("role")
        if role != "user":
            raise InvalidRequest(f"messages[{i}].content[{j}]: file parts are only taken in user messages, not in "
                                 f"{role} messages.", param=f"messages.{i}.content.{j}")
        parts.append(_decode(i, j, part.get("file")))
    return parts


def _decode(i: int, j: int, file) -> FilePart:
    where, param = f"messages[{i}].content[{j}]", f"messages.{i}.content.{j}.file"
    if not isinstance(file, dict):
        raise InvalidRequest(f'{where}: a file part needs "file": {{"filename": ..., "file_data": ...}}.',
                             param=param)
    data, filename = file.get("file_data"), file.get("filename")
    if data is None and file.get("file_id") is not None:
        raise InvalidRequest(f"{where}: file_id is not supported (this server has no Files API); send the file's "
                             "content as file_data, in base64.", param=f"{param}.file_id")
    if not isinstance(data, str) or not data:
        raise InvalidRequest(f"{where}: file_data must be the file's content in base64 (plain, or a data: URL).",
                             param=f"{param}.file_data")
    if filename is not None and not isinstance(filename, str):
        raise InvalidRequest(f"{where}: filename must be a string.", param=f"{param}.filename")
    media_type = None
    if data[:5].lower() == "data:":
        header, comma, data = data.partition(",")
        if not comma or not header.lower().endswith(";base64"):
            raise InvalidRequest(f"{where}: file_data is a data: URL without ';base64,'; its content must be "
                                 "base64.", param=f"{param}.file_data")
        media_type = header[5:].split(";")[0].strip().lower()
    if not (filename or "").strip():
        extension = MEDIA_EXTENSIONS.get(media_type or "")
        if extension is None:
            said = f" (the media type {media_type!r} names none)" if media_type else ""
            raise InvalidRequest(f"{where}: filename is missing; it names the file and its kind{said}: attach a "
                                 f"{ACCEPTED} file.", param=f"{param}.filename")
        filename = "document" + extension
    try:
        content = base64.b64decode("".join(data.split()), validate=True)
    except (binascii.Error, ValueError) as error:
        raise InvalidRequest(f"{where} ({display_name(filename)}): file_data is not valid base64 ({error}).",
                             param=f"{param}.file_data") from None
    return FilePart(i, j, filename, content)


def read(part: FilePart) -> Document:
    """``documents.extract`` of the part (blocking: a worker process): ``InvalidRequest`` with its message,
    ``BackendBusy`` when other documents take every reader."""
    try:
        return extract(part.data, part.filename)
    except DocumentError as error:
        if error.reason == "busy":
            raise BackendBusy(str(error)) from None
        raise InvalidRequest(f"{part.where}: {error}", param=part.param) from None


def with_documents(messages: Sequence[dict], parts: Sequence[FilePart], blocks: dict[FilePart, str]) -> list[dict]:
    """The request's messages, each with file parts made plain text: its parts' blocks (those in ``blocks``;
    a part left out has none) framed before its text."""
    blocks_at: dict[int, list[str]] = {}
    for part in parts:
        blocks_at.setdefault(part.message, []).extend([blocks[part]] if part in blocks else [])
    return framed(messages, blocks_at, plain_text)


def _first_kept(backend, messages: list[dict], parts: list[FilePart], tools: list[dict],
                params: SamplingParams) -> tuple[int | None, PromptPreview]:
    """The earliest message with a document that stays in the context with everything after it, framed (its
    documents' text not yet in), and the preview of the conversation from there; (None, the whole
    conversation's preview) when none does (``documents.prompt.first_kept``). Blocking: tokenizes."""
    counts: dict[int, int] = {}
    for part in parts:
        counts[part.message] = counts.get(part.message, 0) + 1
    return first_kept(lambda kept: backend.preview(model_messages(kept, tools), params), messages, counts,
                      plain_text)


def _room(preview: PromptPreview, exact: bool) -> int:
    return room(preview, exact)


def fit_documents(read_parts: list[tuple[FilePart, Document, str]], room: int, count_tokens: Callable[[str], int],
                  preview: PromptPreview) -> dict[FilePart, FittedDocument]:
    """Each (part, document, question) fitted into a share of ``room`` tokens (``documents.prompt.share_room``);
    ``InvalidRequest`` when a share is under MIN_ROOM_TOKENS or holds not even one passage. Blocking:
    tokenizes and indexes the documents."""
    attached = [(AttachedDocument(document, count_tokens), question) for _, document, question in read_parts]
    try:
        fitted = share_room(attached, room)
    except NoRoom as error:
        part, name, share = read_parts[error.index][0], error.name, error.share
        if error.reason == "no_room":
            raise InvalidRequest(
                f"{part.where}: there is no room in the prompt for {name}: the prompt may use {preview.budget:,} of "
                f"the model's {preview.context_length:,} tokens and the conversation without the documents takes "
                f"{preview.total:,}. Shorten the conversation, lower max_tokens or attach fewer documents.",
                param=part.param) from None
        raise InvalidRequest(
            f"{part.where}: not even one passage of {name} fits in the {share:,} tokens of the prompt left for "
            "it. Shorten the conversation, lower max_tokens or attach fewer documents.", param=part.param) from None
    return {part: result for (part, _, _), result in zip(read_parts, fitted)}


def report(parts: Sequence[FilePart], documents: dict[FilePart, Document],
           fitted: dict[FilePart, FittedDocument]) -> list[dict]:
    """The response's ``documents``: one entry per file part, in request order (module docstring)."""
    entries = []
    for part in parts:
        result = fitted.get(part)
        if result is None:
            entries.append({"filename": display_name(part.filename), "mode": LEFT_OUT, "included_tokens": 0,
                            "total_tokens": None, "suggested_model": None})
        else:
            entries.append({"filename": documents[part].name, "mode": result.mode,
                            "included_tokens": result.included_tokens, "total_tokens": result.total_tokens,
                            "suggested_model": result.suggested_model})
    return entries


async def attach_documents(backend, messages: Sequence, tools: list[dict], params: SamplingParams) -> Attached | None:
    """The request's documents read and put into its messages (module docstring), or None when it has none.

    ``messages``: the request's messages as validated (``openai_api.ChatMessage``: pydantic models with role and
    content; plain dicts are taken too). Raises ``InvalidRequest`` (400) and ``BackendBusy`` (429). Every
    step that parses, tokenizes or waits runs in a worker thread: the event loop never waits on a document."""
    found = await asyncio.to_thread(_request_files, messages)
    if found is None:
        return None
    api_messages, parts = found
    count_tokens, exact = token_counter(backend)
    start, preview = await asyncio.to_thread(_first_kept, backend, api_messages, parts, tools, params)
    kept = [part for part in parts if start is not None and part.message >= start]
    documents = {}
    for part in kept:   # one at a time: the first refusal answers, and the readers are shared with the page
        documents[part] = await asyncio.to_thread(read, part)
    questions = [plain_text(api_messages[part.message].get("content")) for part in kept]
    room = _room(preview, exact) if kept else 0
    fitted = await asyncio.to_thread(fit_documents, [(part, documents[part], question) for part, question
                                                     in zip(kept, questions)], room, count_tokens, preview)
    blocks = {part: result.block for part, result in fitted.items()}
    final = await asyncio.to_thread(_compose, api_messages, parts, blocks, tools,
                                    getattr(backend, "max_input_chars", None))
    return Attached(final, report(parts, documents, fitted))


def _compose(messages: list[dict], parts: list[FilePart], blocks: dict[FilePart, str], tools: list[dict],
             max_chars: int | None) -> list[dict]:
    """The model's messages with the blocks in; ``InvalidRequest`` when a message with documents is now longer
    than the server's character limit for one message (``--max-input-chars``), which the backend would refuse
    without naming the documents."""
    with_blocks = with_documents(messages, parts, blocks)
    for part in parts:
        length = len(with_blocks[part.message]["content"])
        if part in blocks and max_chars and length > max_chars:
            raise InvalidRequest(f"messages[{part.message}]: with its documents the message is {length:,} characters "
                                 f"long, over this server's limit of {max_chars:,} characters for one message "
                                 "(--max-input-chars). Attach a shorter document or fewer documents.",
                                 param=f"messages.{part.message}")
    return model_messages(with_blocks, tools)


def _request_files(messages: Sequence) -> tuple[list[dict], list[FilePart]] | None:
    """(the messages as dicts, their file parts), or None when there are no file parts (the common case, cheap)."""
    def content(message):
        return message.get("content") if isinstance(message, dict) else getattr(message, "content", None)

    if not any(isinstance(content(m), list) and any(isinstance(p, dict) and p.get("type") == "file"
                                                     for p in content(m)) for m in messages):
        return None
    as_dicts = [m if isinstance(m, dict) else m.model_dump() for m in messages]
    return as_dicts, file_parts(as_dicts)
