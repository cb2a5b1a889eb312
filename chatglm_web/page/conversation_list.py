"""The conversation list in the left sidebar: new, switch, search, rename, delete (with undo), export, import;
and ``saving``, the step every change of the conversation ends with.

Every step that reads the browser's storage gets it through its ``js`` (``store.js`` reads it before the
request goes out: the stored copy of this tab's conversation and the list's entries); every step that
writes returns an ``ops`` dict that a following front-end step hands to ``store.js`` to write.
"""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import gradio as gr

from chatglm_web.conversations.browser_store import BrowserStore, Row, Saved, ops, read_import
from chatglm_web.conversations.tree import Conversation, InvalidConversation
from chatglm_web.page.markers import ending_of
from chatglm_web.page.strings import text

log = logging.getLogger(__name__)

QUIET = dict(queue=False, show_progress="hidden", api_visibility="undocumented")
CURRENT_JS = "(stored, ...rest) => [window.chatglmStore.current(), ...rest]"
SNAPSHOT_JS = "(stored, ...rest) => [window.chatglmStore.snapshot(), ...rest]"
APPLY_JS = "(ops) => window.chatglmStore.apply(ops)"
FORGIVE_JS = "(...args) => { window.chatglmStore.forgive(); return args; }"
READ_CHOSEN_JS = "(chosen, stored, ...rest) => [chosen, {data: window.chatglmStore.read(chosen)}, ...rest]"
ALL_JS = "(stored) => [window.chatglmStore.all()]"
PICK_JS = ("async (stored, ...rest) => [{file: await window.chatglmStore.pickFile(), "
           "metas: window.chatglmStore.metas()}, ...rest]")
MAX_IMPORT_BYTES = 8 * 1024 * 1024


def _mb(chars: int) -> str:
    return f"{chars / 1_000_000:.1f}"


def rows_state(rows: list[Row]) -> list[dict]:
    return [row.__dict__ for row in rows]


def choices(rows: list[dict], query: str, lang: str) -> list[tuple[str, str]]:
    words = (query or "").casefold().split()
    found = [row for row in rows if all(word in (row["title"] or "").casefold() for word in words)]
    return [(row["title"] or text("untitled", lang), row["id"]) for row in found]


def list_update(rows: list[dict], query: str, lang: str, current: str | None):
    listed = choices(rows, query, lang)
    return gr.update(choices=listed, value=current if any(c[1] == current for c in listed) else None)


def count_line(store: BrowserStore, rows: list[dict], lang: str) -> str:
    return text("list_count", lang, count=len(rows), max=store.max_conversations,
                used=_mb(sum(row["chars"] for row in rows)), limit=_mb(store.max_chars))


def saved_note(store: BrowserStore, saved: Saved, rows: list[dict], lang: str) -> str:
    lines = [count_line(store, rows, lang)]
    if saved.dropped:
        lines.append(text("dropped_oldest", lang, titles=", ".join(f"“{t or text('untitled', lang)}”"
                                                                     for t in saved.dropped)))
    if saved.too_large:
        lines.append(text("too_large_to_keep", lang, limit=_mb(store.max_conversation_chars)))
    return "\n\n".join(lines)


class ConversationList:
    """The list's steps. ``parts``: the page's components and States (see ``layout.build_page``)."""

    def __init__(self, store: BrowserStore, parts: SimpleNamespace, show_conversation):
        self.store, self.p = store, parts
        self.show_conversation = show_conversation   # (tree, lang) -> the chat's updates for a switched-to tree

    # -- saving ------------------------------------------------------------------------------------------------
    def save(self, stored, tree, lang, query, readonly, title, shown_rows):
        """Store this tab's conversation (merged with what another tab stored meanwhile), within bounds.
        Outputs (ops, list, note, rows, title: the automatic one, unless the visitor is writing one)."""
        if readonly or tree is None:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        if tree.empty:   # nothing to keep; one that was kept (Undo took back all of it) leaves the list
            if not isinstance(stored, dict) or self.store.open_or_none(stored.get("data"), tree.id) is None:
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            rows = rows_state([row for row in self.store.rows(stored.get("metas")) if row.id != tree.id])
            return (ops(remove=[tree.id], tab=tree.id), list_update(rows, query, lang, None),
                    count_line(self.store, rows, lang), rows, gr.skip())
        saved = self.store.save(tree, stored)
        rows = rows_state(saved.rows)
        title = gr.Textbox(value=tree.title) if not (title or "").strip() and tree.title else gr.skip()
        listed = [(row["id"], row["title"]) for row in rows]
        if listed == [(row["id"], row["title"]) for row in shown_rows or []]:   # (while a reply streams: every save)
            return saved.ops, gr.skip(), saved_note(self.store, saved, rows, lang), rows, title
        return (saved.ops, list_update(rows, query, lang, tree.id), saved_note(self.store, saved, rows, lang), rows,
                title)

    def saving(self, dependency):
        """``dependency`` followed by storing the conversation (and writing it in the browser)."""
        p = self.p
        return (dependency
                .then(self.save, [p.stored_in, p.tree, p.lang, p.search, p.readonly, p.title_box, p.rows],
                      [p.store_ops, p.conversation_list, p.list_note, p.rows, p.title_box], js=CURRENT_JS, **QUIET)
                .then(None, [p.store_ops], None, js=APPLY_JS, **QUIET))

    def writing(self, dependency):
        return dependency.then(None, [self.p.store_ops], None, js=APPLY_JS, **QUIET)

    def refresh(self, stored, tree, lang, query):
        """The list read again from what is stored (after every write here, and when another tab wrote).
        Outputs (rows, list); the note keeps what the last change had to say."""
        rows = rows_state(self.store.rows((stored or {}).get("metas") if isinstance(stored, dict) else None))
        return rows, list_update(rows, query, lang, tree.id if tree is not None else None)

    # -- the list's own steps ------------------------------------------------------------------------------------
    def switch(self, chosen, stored, tree, busy, lang, readonly):
        """Show the conversation chosen in the list. Outputs (tree, ops, title, deleted-undo, *chat updates)."""
        p = self.p
        if busy or readonly or not isinstance(chosen, str) or (tree is not None and chosen == tree.id):
            return {p.conversation_list: gr.Radio(value=tree.id if tree is not None else None)}
        found = self.store.open_or_none((stored or {}).get("data"), chosen)
        if found is None:
            return {p.conversation_list: gr.Radio(value=tree.id if tree is not None else None),
                    p.stats: text("error", lang, error=text("server_error", lang))}
        return self.showing(found, lang)

    def showing(self, tree: Conversation, lang: str, extra: dict | None = None) -> dict:
        p = self.p
        return {p.tree: tree, p.store_ops: ops(tab=tree.id), p.title_box: gr.Textbox(value=tree.title),
                p.undo_delete: gr.Button(visible=False), p.share_link: gr.Textbox(value="", visible=False),
                p.conversation_list: gr.Radio(value=tree.id), **self.show_conversation(tree, lang), **(extra or {})}

    def new(self, busy, lang, readonly):
        if busy or readonly:
            return {}
        return self.showing(Conversation(), lang, {self.p.conversation_list: gr.Radio(value=None)})

    def search(self, query, rows, tree, lang):
        return list_update(rows or [], query, lang, tree.id if tree is not None else None)

    def rename(self, title, tree, busy, readonly):
        if tree is None or readonly:
            return gr.skip()
        tree.rename(title or "")
        return gr.Textbox(value=tree.title)

    def delete(self, tree, busy, lang, readonly):
        """Delete this conversation from the browser; Undo brings it back. A new one is shown."""
        p = self.p
        if busy or readonly or tree is None:
            return {}
        if tree.empty:
            return self.new(busy, lang, readonly)
        shown = self.showing(Conversation(), lang)
        shown[p.store_ops] = {**ops(remove=[tree.id], tab=shown[p.tree].id), "forget": True}
        return {**shown, p.deleted: tree, p.undo_delete: gr.Button(visible=True),
                p.list_note: text("deleted", lang, title=tree.title or text("untitled", lang)),
                p.conversation_list: gr.Radio(value=None)}

    def after_delete(self, rows, deleted, query, lang):
        rows = [row for row in rows or [] if deleted is None or row["id"] != deleted.id]
        return rows, list_update(rows, query, lang, None)

    def undo_delete(self, deleted, busy, lang, readonly):
        if deleted is None or busy or readonly:
            return {self.p.undo_delete: gr.Button(visible=False)}
        return {**self.showing(deleted, lang), self.p.deleted: None}

    def export(self, entries):
        return json.dumps(self.store.export(entries), ensure_ascii=False, indent=2)

    def import_file(self, picked, tree, lang, query):
        """Add the conversations of a chosen JSON file (an export, one conversation's download, or an older
        version's download) to the list. Outputs (ops, list, note, rows)."""
        p = self.p
        picked = picked if isinstance(picked, dict) else {}
        chosen = picked.get("file") if isinstance(picked.get("file"), dict) else None
        if chosen is None:
            return {}
        if chosen.get("error") == "too_large" or len(str(chosen.get("text", ""))) > MAX_IMPORT_BYTES:
            size = chosen.get("size") if isinstance(chosen.get("size"), int) else len(str(chosen.get("text", "")))
            return {p.list_note: text("import_failed", lang, error=text("import_too_large", lang, size=size,
                                                                        limit=MAX_IMPORT_BYTES))}
        try:
            conversations = read_import(json.loads(str(chosen.get("text", ""))), ending_of)
        except (ValueError, InvalidConversation) as error:
            return {p.list_note: text("import_failed", lang, error=str(error))}
        saved = self.store.put_many(conversations, picked.get("metas"))
        rows = rows_state(saved.rows)
        note = text("imported", lang, count=len(saved.ops["put"])) + "\n\n" + saved_note(self.store, saved, rows, lang)
        return {p.store_ops: saved.ops, p.rows: rows, p.list_note: note,
                p.conversation_list: list_update(rows, query, lang, tree.id if tree is not None else None)}
