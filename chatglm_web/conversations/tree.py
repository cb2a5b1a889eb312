"""A conversation as a tree of versions: Edit and Regenerate add a version beside the old one, never over it.

    root ─ user "hi" ─┬─ assistant "Hello!"            (version 1/2 of the reply)
                      └─ assistant "Hi there!" ─ user "and you?" ─ …   (version 2/2, shown)

Every node but the root is one half of an exchange: a ``user`` node holds the message, an ``assistant``
node the reply as the chat shows it (its text, and in Tools mode its steps and images: Gradio messages),
how it ended (``end``: None, "stopped", "length", "failed" or "interrupted") and the settings it was
generated with (``generation``: sampling settings, the seed actually used, the mode, the model).
Each node remembers which of its children is shown (``active``); the shown branch is the path from the
root along those, and the conversation continues from its end.

    tree.path()                      the shown branch, nodes from the first message on
    tree.messages()                  its messages, as the model is given them (no markers, no navigation)
    tree.add_user(parent_id, text)   a new message (a new version when the parent has children already)
    tree.add_reply(user_id, …)       a new reply (a new version on Regenerate)
    tree.versions(node_id)           (its number among its siblings, 1-based; how many there are)
    tree.show_version(node_id, step) shows the sibling ``step`` away (‹ -1, › +1); the branch below it
                                     is that sibling's own last shown one
    Conversation.from_dict(data)     reads the JSON form back, refusing anything malformed (it may come
                                     from an import or a tampered browser)

The JSON form (``to_dict``) is documented in the README ("Conversation JSON").
"""

from __future__ import annotations

import math
import secrets
import time
from dataclasses import dataclass, field

FORMAT = "chatglm-web.conversation"
VERSION = 1
ROOT = "root"
ENDS = (None, "stopped", "length", "failed", "interrupted")
TITLE_CHARS = 60
#: Bounds on what ``from_dict`` accepts (an import, or what a browser sends back).
MAX_NODES = 4000
MAX_TEXT = 1_000_000
MAX_REMOVED = 2000


class InvalidConversation(ValueError):
    """Data that is not a conversation this app wrote; the message says what is wrong."""


def new_id(prefix: str = "") -> str:
    return prefix + secrets.token_urlsafe(9)


@dataclass
class Node:
    id: str
    parent: str | None
    role: str                       # "root", "user" or "assistant"
    messages: list[dict] = field(default_factory=list)
    end: str | None = None
    error: str = ""
    generation: dict = field(default_factory=dict)
    created: float = 0.0
    children: list[str] = field(default_factory=list)
    active: str | None = None       # the child shown

    def to_dict(self) -> dict:
        data = {"id": self.id, "parent": self.parent, "role": self.role, "messages": self.messages,
                "created": self.created, "children": self.children, "active": self.active}
        if self.role == "assistant":
            data.update(end=self.end, error=self.error, generation=self.generation)
        return data


@dataclass
class Conversation:
    id: str = field(default_factory=lambda: new_id("c"))
    title: str = ""
    titled_by_user: bool = False
    created: float = field(default_factory=time.time)
    updated: float = 0.0
    nodes: dict[str, Node] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)   # ids taken back (Undo): a merge never brings them back

    def __post_init__(self):
        if ROOT not in self.nodes:
            self.nodes[ROOT] = Node(ROOT, None, "root", created=self.created)
        self.updated = self.updated or self.created

    # -- reading ------------------------------------------------------------------------------------------
    @property
    def empty(self) -> bool:
        return not self.nodes[ROOT].children

    def path(self) -> list[Node]:
        """The shown branch, from the first message to the last (the root left out)."""
        nodes, node = [], self.nodes[ROOT]
        while node.active is not None:
            node = self.nodes[node.active]
            nodes.append(node)
        return nodes

    def last(self) -> Node:
        path = self.path()
        return path[-1] if path else self.nodes[ROOT]

    def messages(self) -> list[dict]:
        """The shown branch's messages, in Gradio's messages format (what the next prompt is built from)."""
        return [dict(message) for node in self.path() for message in node.messages]

    def versions(self, node_id: str) -> tuple[int, int]:
        node = self.nodes[node_id]
        siblings = self.nodes[node.parent].children if node.parent else [node.id]
        return siblings.index(node.id) + 1, len(siblings)

    def size(self) -> int:
        return len(self.nodes) - 1

    # -- changing -----------------------------------------------------------------------------------------
    def _add(self, parent_id: str, role: str, messages: list[dict], **fields) -> Node:
        parent = self.nodes[parent_id]
        node = Node(new_id("m"), parent_id, role, list(messages), created=time.time(), **fields)
        self.nodes[node.id] = node
        parent.children.append(node.id)
        parent.active = node.id
        self._touch()
        return node

    def add_user(self, parent_id: str, text: str, documents: list[dict] | None = None) -> Node:
        """A message after ``parent_id`` (the root or a reply); beside an earlier one there, a new version.
        ``documents``: references to the documents attached to it (``document_refs``; their text is not kept)."""
        if self.nodes[parent_id].role == "user":
            raise ValueError("a message follows a reply, not another message")
        message = {"role": "user", "content": text}
        refs = document_refs(documents)
        if refs:
            message["documents"] = refs
        node = self._add(parent_id, "user", [message])
        if not self.titled_by_user and parent_id == ROOT and not self.title:
            self.title = auto_title(text)
        return node

    def add_reply(self, user_id: str, generation: dict | None = None) -> Node:
        """An empty reply to the message ``user_id`` (a new version beside earlier replies), marked
        interrupted until ``set_reply`` says how it ended: kept mid-reply, it reads as interrupted."""
        if self.nodes[user_id].role != "user":
            raise ValueError("a reply answers a message")
        return self._add(user_id, "assistant", [], end="interrupted", generation=dict(generation or {}))

    def set_reply(self, node_id: str, messages: list[dict], end: str | None = None, error: str = "") -> None:
        if end not in ENDS:
            raise ValueError(f"unknown end {end!r}")
        node = self.nodes[node_id]
        node.messages, node.end, node.error = [dict(m) for m in messages], end, error
        self._touch()

    def remove(self, node_id: str) -> None:
        """``node_id`` and everything after it; its parent then shows the previous version, if any."""
        node = self.nodes[node_id]
        parent = self.nodes[node.parent]
        index = parent.children.index(node_id)
        parent.children.remove(node_id)
        parent.active = parent.children[max(index - 1, 0)] if parent.children else None
        stack = [node_id]
        while stack:
            gone = self.nodes.pop(stack.pop())
            self.removed.append(gone.id)
            stack.extend(gone.children)
        del self.removed[:-MAX_REMOVED]
        if not self.nodes[ROOT].children and not self.titled_by_user:
            self.title = ""
        self._touch()

    def show_version(self, node_id: str, step: int) -> str:
        """Show the sibling ``step`` away from ``node_id`` (clamped to the first and last); its id."""
        node = self.nodes[node_id]
        parent = self.nodes[node.parent]
        index = min(max(parent.children.index(node_id) + step, 0), len(parent.children) - 1)
        parent.active = parent.children[index]
        return parent.active

    def rename(self, title: str) -> None:
        title = " ".join(title.split())[:200]
        self.title, self.titled_by_user = (title, True) if title else (self._first_title(), False)
        self._touch()

    def _first_title(self) -> str:
        first = self.nodes[ROOT].children
        return auto_title(self.nodes[first[0]].messages[0]["content"]) if first else ""

    def _touch(self) -> None:
        self.updated = max(time.time(), self.updated)

    # -- merging two copies (two tabs on one conversation) ---------------------------------------------------
    def merge(self, other: "Conversation") -> None:
        """Take every node of ``other`` this copy lacks (the same conversation changed in another tab), so
        that neither tab's versions are lost; where both have a node, the one changed later is kept."""
        if other.id != self.id:
            raise ValueError("only copies of one conversation merge")
        gone = set(self.removed) | set(other.removed)
        other_nodes, stack = {}, [ROOT]   # theirs, less what was taken back and everything after it
        while stack:
            node_id = stack.pop()
            if node_id == ROOT or node_id not in gone:
                other_nodes[node_id] = other.nodes[node_id]
                stack.extend(other.nodes[node_id].children)
        for node_id, theirs in other_nodes.items():
            mine = self.nodes.get(node_id)
            if mine is None:
                self.nodes[node_id] = Node(**{**theirs.__dict__, "children": [], "active": None})
        for node_id, theirs in other_nodes.items():   # children in a stable order, mine first
            mine = self.nodes[node_id]
            for child in theirs.children:
                if child not in mine.children and child in self.nodes:
                    mine.children.append(child)
            if mine.active is None:
                mine.active = theirs.active if theirs.active in self.nodes else (mine.children or [None])[-1]
        for node_id, theirs in other_nodes.items():
            mine = self.nodes[node_id]
            if mine.role == "assistant" and theirs.end != "interrupted" and mine.end == "interrupted" \
                    and len(str(theirs.messages)) >= len(str(mine.messages)):
                mine.messages, mine.end, mine.error = theirs.messages, theirs.end, theirs.error
        for node_id in other.removed:   # taken back in the other copy: taken back here too
            if node_id in self.nodes:
                self.remove(node_id)
        self.removed = list(dict.fromkeys(self.removed + other.removed))[-MAX_REMOVED:]
        if other.titled_by_user and other.updated > self.updated:
            self.title, self.titled_by_user = other.title, True
        self.updated = max(self.updated, other.updated)

    # -- the JSON form ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "id": self.id, "title": self.title,
                "titled_by_user": self.titled_by_user, "created": self.created, "updated": self.updated,
                "nodes": [node.to_dict() for node in self.nodes.values()], "removed": self.removed}

    @classmethod
    def from_dict(cls, data) -> "Conversation":
        return _read(data)


def auto_title(text: str) -> str:
    words = " ".join(str(text).split())
    return words if len(words) <= TITLE_CHARS else words[:TITLE_CHARS - 1].rstrip() + "…"


def from_history(history: list, *, title: str = "", ending_of=None) -> Conversation:
    """A conversation from a linear Gradio history (what versions before 0.5 kept in the browser, or a
    Markdown-era JSON download): user messages and the assistant messages after each.

    ``ending_of(content)``, when given, reads a marker message: ``(end, error)`` for an assistant message
    that says how the reply before it ended ("stopped", "length", "failed", "interrupted"; the page's
    ``markers.ending_of``), None for an ordinary message. Without it every message is kept as it is."""
    conversation = Conversation()
    parent = ROOT
    reply: Node | None = None
    for message in history or []:
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            continue
        if message["role"] == "user":
            if conversation.nodes[parent].role == "user":   # two messages in a row: an empty reply between
                parent = conversation.add_reply(parent).id
                conversation.set_reply(parent, [])
            content = message.get("content")
            text = content if isinstance(content, str) else _text_of(content)
            parent, reply = conversation.add_user(parent, text).id, None
            continue
        ending = ending_of(message.get("content")) if ending_of else None
        if reply is None:
            if conversation.nodes[parent].role != "user":
                continue   # a reply before any message
            reply = conversation.add_reply(parent)
            conversation.set_reply(reply.id, [])
            parent = reply.id
        if ending is not None:
            reply.end, error = ending
            if reply.end == "failed":
                reply.error = error
        else:
            reply.messages.append(dict(message))
    if title:
        conversation.rename(title)
    return conversation


def _text_of(content) -> str:
    from chatglm_web.messages import plain_text

    return plain_text(content)


# -- reading the JSON form back, strictly ---------------------------------------------------------------------
def _read(data) -> Conversation:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InvalidConversation(f"not a conversation (its \"format\" must be {FORMAT!r})")
    if data.get("version") != VERSION:
        raise InvalidConversation(f"unknown conversation version {data.get('version')!r} (this app reads {VERSION})")
    nodes_data = data.get("nodes")
    if not isinstance(nodes_data, list) or not nodes_data:
        raise InvalidConversation("a conversation needs its \"nodes\"")
    if len(nodes_data) > MAX_NODES:
        raise InvalidConversation(f"too many messages: {len(nodes_data):,}, the limit is {MAX_NODES:,}")
    nodes: dict[str, Node] = {}
    for item in nodes_data:
        node = _node(item)
        if node.id in nodes:
            raise InvalidConversation(f"two nodes share the id {node.id!r}")
        nodes[node.id] = node
    if ROOT not in nodes or nodes[ROOT].role != "root" or nodes[ROOT].parent is not None:
        raise InvalidConversation("a conversation needs its root node")
    for node in nodes.values():
        if node.id != ROOT and (node.parent not in nodes or node.id not in nodes[node.parent].children):
            raise InvalidConversation(f"node {node.id!r} is not its parent's child")
        for child in node.children:
            if child not in nodes or nodes[child].parent != node.id:
                raise InvalidConversation(f"node {node.id!r} names a child that is not its own")
        if len(set(node.children)) != len(node.children):
            raise InvalidConversation(f"node {node.id!r} names a child twice")
        if node.active is not None and node.active not in node.children:
            raise InvalidConversation(f"node {node.id!r} shows a child it does not have")
        wanted = {"root": ("user",), "user": ("assistant",), "assistant": ("user",)}[node.role]
        if any(nodes[child].role not in wanted for child in node.children):
            raise InvalidConversation(f"a {node.role} node's children must be {wanted[0]} nodes")
    # every node is reached from the root exactly once (parents and children agree, so no cycles either)
    seen, stack = set(), [ROOT]
    while stack:
        node_id = stack.pop()
        seen.add(node_id)
        stack.extend(nodes[node_id].children)
    if len(seen) != len(nodes):
        raise InvalidConversation("some nodes are not reached from the root")
    title = data.get("title", "")
    if not isinstance(title, str) or not isinstance(data.get("id"), str) or not 0 < len(data["id"]) <= 64:
        raise InvalidConversation("a conversation needs a string \"id\" (at most 64 characters) and \"title\"")
    created, updated = _seconds(data.get("created", 0)), _seconds(data.get("updated", 0))
    if created is None or updated is None or created < 0 or updated < 0:
        raise InvalidConversation("\"created\" and \"updated\" are times in seconds")
    removed = data.get("removed", [])
    if not isinstance(removed, list) or not all(isinstance(r, str) and len(r) <= 64 and r not in nodes
                                                for r in removed):
        raise InvalidConversation("\"removed\" must be a list of ids of nodes no longer in the conversation")
    return Conversation(id=data["id"], title=title[:200], titled_by_user=bool(data.get("titled_by_user")),
                        created=created, updated=updated, nodes=nodes,
                        removed=removed[-MAX_REMOVED:])


def _seconds(value) -> float | None:
    """A time as a finite float; None for anything else (JSON numbers may be NaN, infinite, or too large)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def _node(item) -> Node:
    if not isinstance(item, dict):
        raise InvalidConversation("each node is an object")
    node_id, parent, role = item.get("id"), item.get("parent"), item.get("role")
    if not isinstance(node_id, str) or not 0 < len(node_id) <= 64:
        raise InvalidConversation("each node needs a string \"id\" of at most 64 characters")
    if role not in ("root", "user", "assistant") or (parent is not None and not isinstance(parent, str)):
        raise InvalidConversation(f"node {node_id!r}: \"role\" must be user or assistant, \"parent\" an id")
    messages = item.get("messages", [])
    if not isinstance(messages, list) or not all(_message_ok(m) for m in messages):
        raise InvalidConversation(f"node {node_id!r}: \"messages\" must be chat messages with text content")
    if role == "user" and (len(messages) != 1 or messages[0]["role"] != "user"
                           or not isinstance(messages[0]["content"], str)):
        raise InvalidConversation(f"node {node_id!r}: a user node holds one user message")
    if role == "assistant" and any(m["role"] != "assistant" for m in messages):
        raise InvalidConversation(f"node {node_id!r}: an assistant node holds assistant messages")
    children = item.get("children", [])
    if not isinstance(children, list) or not all(isinstance(c, str) for c in children):
        raise InvalidConversation(f"node {node_id!r}: \"children\" must be ids")
    active = item.get("active")
    end = item.get("end")
    if end not in ENDS:
        raise InvalidConversation(f"node {node_id!r}: \"end\" must be one of {list(ENDS)}")
    error = item.get("error", "")
    generation = item.get("generation", {})
    created = _seconds(item.get("created", 0))
    if not isinstance(error, str) or not isinstance(generation, dict) or created is None:
        raise InvalidConversation(f"node {node_id!r}: \"error\", \"generation\" or \"created\" is malformed")
    generation = {k: v for k, v in generation.items()
                  if isinstance(k, str) and (v is None or isinstance(v, (str, int, float, bool)))}
    return Node(node_id, parent, role, [_clean(m) for m in messages], end, error[:2000], generation,
                created, list(children), active if isinstance(active, str) else None)


def _clean(message: dict) -> dict:
    """Only what a chat message has: its role, content and (a tool step's) metadata of plain values."""
    out = {"role": message["role"], "content": message["content"]}
    metadata = message.get("metadata")
    if isinstance(metadata, dict):
        out["metadata"] = {k: v for k, v in metadata.items() if isinstance(k, str) and isinstance(v, (str, int, float))}
    refs = document_refs(message.get("documents")) if message["role"] == "user" else []
    if refs:
        out["documents"] = refs
    return out


#: What a user message keeps of each document attached to it (the page's chip; the text is never kept).
DOCUMENT_REF_KEYS = {"id": str, "name": str, "kind": str, "pages": int, "chars": int, "tokens": int}
MAX_DOCUMENT_REFS = 8


def document_refs(value) -> list[dict]:
    """The well-formed document references in ``value`` (a list of {id, name, kind, pages, chars, tokens};
    ``pages`` may be null), at most MAX_DOCUMENT_REFS, strings cut to 255 characters; others left out."""
    if not isinstance(value, list):
        return []
    refs = []
    for item in value[:MAX_DOCUMENT_REFS]:
        if not isinstance(item, dict) or not isinstance(item.get("id"), str) or not isinstance(item.get("name"), str):
            continue
        ref = {}
        for key, kind in DOCUMENT_REF_KEYS.items():
            found = item.get(key)
            if kind is int and (isinstance(found, bool) or not isinstance(found, int)):
                found = None if key == "pages" else 0
            elif kind is str:
                found = found[:255] if isinstance(found, str) else ""
            ref[key] = found
        refs.append(ref)
    return refs


def _message_ok(message) -> bool:
    if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
        return False
    content = message.get("content")
    if isinstance(content, str):
        return len(content) <= MAX_TEXT
    if isinstance(content, (dict, list)):
        return len(str(content)) <= MAX_TEXT   # a file or Gradio's content parts (images of a tool step)
    return False
