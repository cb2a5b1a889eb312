"""A conversation tree as the chat shows it: the shown branch's messages, with after a reply how it ended
(a marker, ``markers.py``) and after a message with several versions its ‹ 2/3 › links. A message with
documents has their chips under it, and a reply made with them a line saying what of them the model saw
(``document_chips.py``).

    messages, shown = view(tree, lang)    shown[i]: the tree node the chat's message i belongs to

The version links are ``#version:<node id>:<step>`` links (the chat sanitizes its HTML, and links are
what survives it); ``store.js`` sends a click on one to the server through a hidden button, and
``navigate`` reads it back. Events that carry a chat message's index (Retry, Undo, Edit) find the node
through ``shown``.
"""

from __future__ import annotations

import html
import re

from chatglm_web.conversations.tree import Conversation
from chatglm_web.page.document_chips import chips_message, note_message, report_of
from chatglm_web.page.document_store import is_live
from chatglm_web.page.markers import marker
from chatglm_web.page.strings import text

NAV_CLASS = "version-nav"
_REQUEST = re.compile(r"(?P<node>[A-Za-z0-9_-]{1,64}):(?P<step>-1|1)")


def nav_message(tree: Conversation, node_id: str, lang: str) -> dict:
    node = tree.nodes[node_id]
    number, count = tree.versions(node_id)
    previous = text("previous_version", lang)
    following = text("next_version", lang)
    links = []
    if number > 1:
        links.append(f'<a href="#version:{node.id}:-1">‹<span class="visually-hidden">{previous}</span></a>')
    else:
        links.append('<span class="nav-end">‹</span>')
    links.append(f'<span class="nav-count">{number} / {count}</span>')
    if number < count:
        links.append(f'<a href="#version:{node.id}:1">›<span class="visually-hidden">{following}</span></a>')
    else:
        links.append('<span class="nav-end">›</span>')
    label = html.escape(text("versions_of", lang))
    return {"role": node.role, "content": f'<span class="{NAV_CLASS}" title="{label}">{" ".join(links)}</span>'}


def view(tree: Conversation | None, lang: str, streaming: str | None = None, *,
         plain: bool = False) -> tuple[list[dict], list[str]]:
    """``streaming``: the reply being written, shown without the "interrupted" marker it is stored with.
    ``plain``: documents' chips and notes as text (a Markdown download), not the page's HTML."""
    if tree is None:
        return [], []
    messages, shown = [], []
    for node in tree.path():
        body = [dict(m) for m in node.messages]
        if node.role == "user" and body and "documents" in body[0]:   # its documents' chips, under it
            body.append(chips_message(body[0].pop("documents"), lang, is_live, plain=plain))
        note = note_message(report_of(node.generation), lang, plain=plain) if node.role == "assistant" else None
        if note is not None:   # what of the documents the model saw
            body.append(note)
        if node.role == "assistant" and node.end is not None and node.id != streaming:
            body.append(marker(node.end, lang, node.error))
        if node.role == "user" or body:
            messages += body
            shown += [node.id] * len(body)
        if tree.versions(node.id)[1] > 1:
            messages.append(nav_message(tree, node.id, lang))
            shown.append(node.id)
    return messages, shown


def is_nav(message) -> bool:
    content = message.get("content") if isinstance(message, dict) else None
    return isinstance(content, str) and content.startswith(f'<span class="{NAV_CLASS}"')


def node_at(tree: Conversation | None, shown: list[str], index) -> str | None:
    """The node the chat's message ``index`` belongs to (None when the chat and the tree disagree)."""
    if tree is None or not isinstance(index, int) or not 0 <= index < len(shown):
        return None
    node_id = shown[index]
    return node_id if node_id in tree.nodes else None


def navigate(tree: Conversation | None, request) -> bool:
    """Follow a version link's request (``<node id>:<step>``); whether the shown branch changed."""
    match = _REQUEST.fullmatch(request) if isinstance(request, str) else None
    if tree is None or match is None or match["node"] not in tree.nodes or tree.nodes[match["node"]].parent is None:
        return False
    before = tree.nodes[tree.nodes[match["node"]].parent].active
    return tree.show_version(match["node"], int(match["step"])) != before
