"""How documents look on the page: the 📎 button, the chips of a message's documents (pending over the message
box, then under the message), and the note under a reply saying what of them the model saw. ``plain``
versions are text, for downloads."""

from __future__ import annotations

import html
import json

from chatglm_web.documents.document import KIND_NAMES
from chatglm_web.documents.limits import LIMITS, megabytes
from chatglm_web.documents.sniff import ACCEPTED
from chatglm_web.page.document_store import PAGE_FILE_BYTES
from chatglm_web.page.strings import text

#: The chip line in the chat (a user message of its own after the message's text).
CHIPS_CLASS = "doc-chips"
NOTE_CLASS = "doc-note"


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


def button_html(lang: str) -> str:
    """The 📎 button: a real button with an accessible name (``documents.js`` opens the file picker)."""
    accepted = ".txt、.md、.pdf、.docx 或 .html" if lang == "zh-CN" else ACCEPTED
    label = html.escape(text("doc_attach", lang, accepted=accepted, limit=megabytes(PAGE_FILE_BYTES),
                             pages=LIMITS.pages, chars=LIMITS.chars))
    accept = ".txt,.md,.markdown,.pdf,.docx,.html,.htm"
    return (f'<button type="button" class="attach-button" aria-label="{label}" title="{label}" '
            f'data-accept="{accept}" data-limit="{PAGE_FILE_BYTES}">📎</button>')
