"""Share links: the shown branch of a conversation, carried in the link itself (no server storage).

    https://host/#share=<token>

The token is the payload below, sealed with the state secret for the purpose "share" (``sealed.py``):
compressed, encrypted and authenticated, so any replica with the same secret opens it and nobody can
forge or alter one. It sits in the URL's fragment, which browsers never send to a server: it reaches
the app only through the page, and never appears in an access log.

    {"format": "chatglm-web.share", "version": 1,
     "conversation": <the shown branch, as a conversation (tree.py) with one version per message>,
     "model": "THUDM/chatglm3-6b", "precision": "bf16",
     "generation": {the last reply's sampling settings, seed and mode}}

A conversation whose token would pass ``MAX_TOKEN_CHARS`` gets ``TooLong``, which says the limit.
``replay_diff(shared, replayed)`` shows where a reply generated again differs from the shared one.
"""

from __future__ import annotations

import difflib
import html
import re

from chatglm_web.conversations.sealed import Sealer, Unreadable
from chatglm_web.conversations.tree import ROOT, Conversation, InvalidConversation, Node

FORMAT = "chatglm-web.share"
VERSION = 1
#: Longer links are cut by chat apps and some browsers (Chrome takes 2 MB, but a link is meant to be pasted).
MAX_TOKEN_CHARS = 32_000


class TooLong(ValueError):
    def __init__(self, chars: int, limit: int = MAX_TOKEN_CHARS):
        super().__init__(f"this conversation is too long for a link: {chars:,} characters, the limit is {limit:,}")
        self.chars, self.limit = chars, limit


def shown_branch(conversation: Conversation) -> Conversation:
    """A copy holding only the shown branch (one version of each message)."""
    copy = Conversation(id=conversation.id, title=conversation.title, titled_by_user=conversation.titled_by_user,
                        created=conversation.created, updated=conversation.updated)
    parent = copy.nodes[ROOT]
    for node in conversation.path():
        kept = Node(node.id, parent.id, node.role, [dict(m) for m in node.messages], node.end, node.error,
                    dict(node.generation), node.created)
        copy.nodes[kept.id] = kept
        parent.children, parent.active = [kept.id], kept.id
        parent = kept
    return copy


def last_generation(conversation: Conversation) -> dict:
    replies = [node for node in conversation.path() if node.role == "assistant"]
    return dict(replies[-1].generation) if replies else {}


class ShareLinks:
    def __init__(self, secret: str, max_chars: int = MAX_TOKEN_CHARS):
        self.sealer = Sealer(secret, "share")
        self.max_chars = max_chars

    def token(self, conversation: Conversation, *, model: str, precision: str) -> str:
        branch = shown_branch(conversation)
        payload = {"format": FORMAT, "version": VERSION, "conversation": branch.to_dict(), "model": model,
                   "precision": precision, "generation": last_generation(branch)}
        token = self.sealer.seal(payload)
        if len(token) > self.max_chars:
            raise TooLong(len(token), self.max_chars)
        return token

    def open(self, token) -> tuple[Conversation, dict]:
        """(the shared conversation, {"model", "precision", "generation"}); ``ValueError`` saying why not."""
        payload = self.sealer.open(token, max_chars=self.max_chars)
        if not isinstance(payload, dict) or payload.get("format") != FORMAT or payload.get("version") != VERSION:
            raise Unreadable("not a share link of this app")
        conversation = Conversation.from_dict(payload.get("conversation"))
        about = {"model": str(payload.get("model", "")), "precision": str(payload.get("precision", "")),
                 "generation": payload.get("generation") if isinstance(payload.get("generation"), dict) else {}}
        return conversation, about


def replay_inputs(conversation: Conversation) -> tuple[list[dict], str, Node]:
    """(the history before the last message, the last message, the shared last reply) to generate it again."""
    path = conversation.path()
    replies = [i for i, node in enumerate(path) if node.role == "assistant"]
    if not replies:
        raise InvalidConversation("the shared conversation has no reply to replay")
    last = replies[-1]
    user = path[last - 1]
    history = [dict(m) for node in path[:last - 1] for m in node.messages]
    return history, user.messages[0]["content"], path[last]


_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
_TOKENS = re.compile(rf"[{_CJK}]|\s+|[^\W{_CJK}]+|[^\w\s]")


def replay_diff(shared: str, replayed: str) -> tuple[bool, str]:
    """(identical, HTML of the replayed reply with what differs from the shared one marked: <del> what the
    shared reply had, <ins> what the replay wrote instead), word by word (a CJK character is a word)."""
    if shared == replayed:
        return True, html.escape(replayed)
    before, after = _TOKENS.findall(shared), _TOKENS.findall(replayed)
    parts = []
    for op, a1, a2, b1, b2 in difflib.SequenceMatcher(None, before, after, autojunk=False).get_opcodes():
        if op == "equal":
            parts.append(html.escape("".join(after[b1:b2])))
            continue
        if a2 > a1:
            parts.append(f"<del>{html.escape(''.join(before[a1:a2]))}</del>")
        if b2 > b1:
            parts.append(f"<ins>{html.escape(''.join(after[b1:b2]))}</ins>")
    return False, "".join(parts)
