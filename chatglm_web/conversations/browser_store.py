"""The conversation list kept in the visitor's browser: the server half (the browser half is ``page/store.js``).

The browser keeps, in ``localStorage``, two entries per conversation, both sealed here (``sealed.py``):

    chatglm-web:conversation:<id>   the whole tree (``tree.Conversation.to_dict``)
    chatglm-web:meta:<id>           {"title", "created", "updated"} (for the list, without opening every tree)

and, in ``sessionStorage`` (one per tab, kept across a reload), which conversation the tab shows. So each
tab works on its own conversation, and storage is written one conversation at a time, never as one blob:
two tabs chatting at once write different entries. Two tabs on the *same* conversation merge: every
save first reads what is stored and takes the nodes it lacks (``Conversation.merge``).

The list is bounded (``MAX_CONVERSATIONS`` and ``MAX_STORED_CHARS`` of sealed text, below the 5 M
characters a browser gives a site); a save that goes over drops the least recently changed other
conversations and says which.

What the browser sends is what ``store.js`` read: ``{"data": sealed tree or null, "metas": [[id, sealed
meta, characters], ...]}``; what this returns for it to write is an ``Ops`` dict (``{"put": [[id, tree,
meta]], "remove": [ids], "tab": id}``).
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field

from chatglm_web.conversations.sealed import Sealer, Unreadable
from chatglm_web.conversations.tree import Conversation, InvalidConversation, from_history

log = logging.getLogger(__name__)

MAX_CONVERSATIONS = 100
MAX_STORED_CHARS = 4_000_000
#: One conversation's sealed text at most (larger is not kept; the page says so).
MAX_CONVERSATION_CHARS = 1_500_000
EXPORT_FORMAT = "chatglm-web.conversations"


@dataclass
class Row:
    id: str
    title: str
    updated: float
    chars: int = 0


@dataclass
class Saved:
    ops: dict
    rows: list[Row]
    dropped: list[str] = field(default_factory=list)   # titles of conversations dropped to stay in bounds
    too_large: bool = False


def ops(put=(), remove=(), tab: str | None = None) -> dict:
    """What ``store.js`` writes; the nonce makes every write a change Gradio passes on."""
    return {"put": [list(p) for p in put], "remove": list(remove), "tab": tab, "nonce": secrets.token_hex(4)}


class BrowserStore:
    def __init__(self, secret: str, *, max_conversations: int = MAX_CONVERSATIONS,
                 max_chars: int = MAX_STORED_CHARS, max_conversation_chars: int = MAX_CONVERSATION_CHARS):
        self.trees = Sealer(secret, "conversation")
        self.metas = Sealer(secret, "conversation-meta")
        self.max_conversations = max_conversations
        self.max_chars = max_chars
        self.max_conversation_chars = min(max_conversation_chars, max_chars)

    # -- one conversation ------------------------------------------------------------------------------------
    def seal(self, conversation: Conversation) -> tuple[str, str]:
        meta = {"id": conversation.id, "title": conversation.title, "created": conversation.created,
                "updated": conversation.updated}
        return self.trees.seal(conversation.to_dict()), self.metas.seal(meta)

    def open(self, sealed) -> Conversation:
        """Raises ``Unreadable`` or ``InvalidConversation`` (both ``ValueError``) with the reason."""
        return Conversation.from_dict(self.trees.open(sealed, max_chars=self.max_chars))

    def open_or_none(self, sealed, conversation_id: str | None = None) -> Conversation | None:
        if not sealed:
            return None
        try:
            conversation = self.open(sealed)
        except ValueError as error:
            log.info("a stored conversation could not be read: %s", error)
            return None
        return conversation if conversation_id is None or conversation.id == conversation_id else None

    # -- the list ------------------------------------------------------------------------------------------
    def rows(self, metas) -> list[Row]:
        """The list, newest first, from what ``store.js`` read; unreadable entries are left out."""
        rows = []
        for entry in metas if isinstance(metas, list) else []:
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)):
                continue
            try:
                meta = self.metas.open(entry[1], max_chars=10_000)
            except Unreadable:
                continue
            if isinstance(meta, dict) and meta.get("id") == entry[0]:
                chars = entry[2] if isinstance(entry[2], int) and entry[2] >= 0 else 0
                rows.append(Row(entry[0], str(meta.get("title") or ""), float(meta.get("updated") or 0), chars))
        return sorted(rows, key=lambda row: row.updated, reverse=True)

    def save(self, conversation: Conversation, stored, *, tab: bool = True) -> Saved:
        """Store ``conversation`` (merged with the stored copy another tab may have changed), within bounds."""
        stored = stored if isinstance(stored, dict) else {}
        theirs = self.open_or_none(stored.get("data"), conversation.id)
        if theirs is not None:
            conversation.merge(theirs)
        tree, meta = self.seal(conversation)
        rows = [row for row in self.rows(stored.get("metas")) if row.id != conversation.id]
        if len(tree) > self.max_conversation_chars:
            return Saved(ops(tab=conversation.id if tab else None), rows, too_large=True)
        mine = Row(conversation.id, conversation.title, conversation.updated, len(tree) + len(meta))
        kept, dropped = self._bounded([mine, *rows])
        return Saved(ops([(conversation.id, tree, meta)], [row.id for row in dropped],
                         conversation.id if tab else None), kept, [row.title for row in dropped])

    def _bounded(self, rows: list[Row]) -> tuple[list[Row], list[Row]]:
        """(kept, dropped): the first row (the one being saved) is always kept; then the newest that fit."""
        first, others = rows[0], sorted(rows[1:], key=lambda row: row.updated, reverse=True)
        kept, dropped, total = [first], [], first.chars
        for row in others:
            if len(kept) < self.max_conversations and total + row.chars <= self.max_chars:
                kept.append(row)
                total += row.chars
            else:
                dropped.append(row)
        return sorted(kept, key=lambda row: row.updated, reverse=True), dropped

    def put_many(self, conversations: list[Conversation], metas) -> Saved:
        """Store several conversations (an import) beside the stored ones, within bounds."""
        rows = self.rows(metas)
        taken = {row.id for row in rows}
        put, mine, too_large = [], [], False
        for conversation in conversations:
            if conversation.id in taken:   # the same conversation imported again, or another one's id
                conversation.id = Conversation().id
            taken.add(conversation.id)
            tree, meta = self.seal(conversation)
            if len(tree) > self.max_conversation_chars:
                too_large = True
                continue
            put.append((conversation.id, tree, meta))
            mine.append(Row(conversation.id, conversation.title, conversation.updated, len(tree) + len(meta)))
        everything = sorted(mine + rows, key=lambda row: row.updated, reverse=True)
        if not everything:
            return Saved(ops(), [], too_large=too_large)
        kept, dropped = self._bounded(everything)
        dropped_ids = {row.id for row in dropped}
        return Saved(ops([p for p in put if p[0] not in dropped_ids], [r.id for r in dropped if r.id not in
                                                                         {p[0] for p in put}]),
                     kept, [row.title for row in dropped], too_large)

    # -- export, import, migration ---------------------------------------------------------------------------
    def export(self, entries) -> dict:
        """Every stored conversation ``entries`` ([[id, sealed tree], ...]) holds, as one JSON document."""
        conversations = []
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, list) and len(entry) == 2:
                conversation = self.open_or_none(entry[1], entry[0])
                if conversation is not None:
                    conversations.append(conversation)
        conversations.sort(key=lambda c: c.updated, reverse=True)
        return {"format": EXPORT_FORMAT, "version": 1, "conversations": [c.to_dict() for c in conversations]}


def read_import(data, ending_of=None) -> list[Conversation]:
    """The conversations in an imported JSON document: an export of all (``EXPORT_FORMAT``), one
    conversation's JSON download, or a linear ``{"messages": [...]}`` download of an older version (its
    marker messages read by ``ending_of``, see ``tree.from_history``).
    Raises ``InvalidConversation`` saying what is wrong."""
    if isinstance(data, dict) and data.get("format") == EXPORT_FORMAT:
        items = data.get("conversations")
        if not isinstance(items, list):
            raise InvalidConversation("an export needs its \"conversations\" list")
        if len(items) > MAX_CONVERSATIONS:
            raise InvalidConversation(f"too many conversations: {len(items):,}, the limit is {MAX_CONVERSATIONS}")
        return [Conversation.from_dict(item) for item in items]
    if isinstance(data, dict) and isinstance(data.get("messages"), list) and "format" not in data:
        conversation = from_history(data["messages"], ending_of=ending_of)
        if conversation.empty:
            raise InvalidConversation("the file holds no messages")
        # read back as any import is, so that what is stored opens again (content, sizes, number of messages)
        return [Conversation.from_dict(conversation.to_dict())]
    return [Conversation.from_dict(data)]
