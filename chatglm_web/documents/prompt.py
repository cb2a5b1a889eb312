"""Documents in a prompt: the room a conversation leaves for them, sharing it among several documents, and
the ``<document>`` frame around each one's block in its user message. Used by the OpenAI API
(``api/documents.py``) and the page (``page/attachments.py``), which add their own messages and errors.

    count_tokens, exact = token_counter(backend)       # the model's tokenizer, or an estimate
    start, preview = first_kept(preview_of, messages, {2: 1})   # the earliest message with documents that stays
    tokens = room(preview, exact)                       # what the prompt leaves for the documents' text
    fitted = share_room(attached_and_questions, tokens) # a FittedDocument each (NoRoom when one cannot fit)
    messages = framed(messages, {2: [block, ...]})      # each block between OPEN and CLOSE before the text

The room. The preview of the conversation with each document's frame but none of its text says how many
prompt tokens it takes (``total``) and may take (``budget``: the context less room for the reply);
``room = budget - total`` less a margin for the tokenizer's joins (``MARGIN_TOKENS`` + ``MARGIN_SHARE``;
``ESTIMATE_MARGIN_SHARE`` when tokens are only estimated). The documents have priority over older turns:
``first_kept`` finds the earliest message with a document that stays in the context with everything after
it (the system message kept), so earlier turns are dropped, as for any long conversation, to make room.
The room is shared among the documents smallest first, each getting an equal share of what the ones
before it left.

Imports: ``generation`` (``PromptPreview``) and this package; nothing of the page or the API.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from chatglm_web.documents.fitting import AttachedDocument, FittedDocument
from chatglm_web.documents.retrieval import estimate_tokens
from chatglm_web.generation import PromptPreview

MIN_ROOM_TOKENS = 64          # a document's share of the prompt must be at least this many tokens
MARGIN_TOKENS = 16            # kept free of the room: a block counted alone vs. inside its message ...
MARGIN_SHARE = 0.02           # ... plus this share of the room
ESTIMATE_MARGIN_SHARE = 0.25  # the share kept free when tokens are only estimated (no tokenizer here)
COUNT_PIECE_CHARS = 32_768    # a long text is tokenized in pieces this long (see ``token_counter``)
OPEN, CLOSE = "<document>", "</document>"


class NoRoom(ValueError):
    """A document that cannot go into the prompt: ``reason`` "no_room" (its share is under MIN_ROOM_TOKENS)
    or "no_passage" (not even one passage fits its share); ``index`` is its place in ``share_room``'s list."""

    def __init__(self, reason: str, index: int, name: str, share: int):
        super().__init__(f"{reason}: {name} ({share} tokens)")
        self.reason, self.index, self.name, self.share = reason, index, name, share


def token_counter(backend) -> tuple[Callable[[str], int], bool]:
    """(count_tokens, exact): how a document's text is counted against the prompt's budget.

    ``ChatBackend`` itself offers no tokenizer, but the backends that build prompts here keep their chat
    format in the public attribute ``format`` (``LocalBackend``; ``RemoteBackend``, None there when the
    served model's tokenizer is not available here), and a format counts plain text in ``text_tokens(text)``
    (``families.family.ChatFormat``: its tokenizer's ids, never a special one). With one the counts are the
    model's own tokens (a piece encoded alone may count a token more than inside the
    message, its dummy-prefix "▁": ``MARGIN_TOKENS`` covers the joins). Otherwise, as for a remote server
    without a local tokenizer, whose ``preview`` estimates too, the documents package's own estimate
    (``estimate_tokens``: one token per CJK character, one per four others), and ``exact`` is False.

    A tokenizer's ``encode`` may hold the GIL while it runs (sentencepiece does: about 0.3 s for a megabyte),
    which would stall the event loop however off it the call is made; so a text longer than
    COUNT_PIECE_CHARS is counted in pieces of that length and the counts summed (a cut may split a token:
    a count over by a token or two per piece, on the safe side).
    """
    count = getattr(getattr(backend, "format", None), "text_tokens", None)
    if count is not None:
        return in_pieces(count), True
    return estimate_tokens, False


def in_pieces(count: Callable[[str], int]) -> Callable[[str], int]:
    def counted(text: str) -> int:
        if len(text) <= COUNT_PIECE_CHARS:
            return count(text)
        return sum(count(text[at:at + COUNT_PIECE_CHARS]) for at in range(0, len(text), COUNT_PIECE_CHARS))
    return counted


def frame(blocks: Sequence[str], question: str) -> str:
    """A user message's text with its documents' blocks: each between OPEN and CLOSE lines, then the question."""
    parts = [f"{OPEN}\n{block}\n{CLOSE}" for block in blocks]
    if question.strip():
        parts.append(question)
    return "\n\n".join(parts)


def framed(messages: Sequence[dict], blocks_at: dict[int, Sequence[str]], text_of=None) -> list[dict]:
    """``messages`` with the blocks of ``blocks_at`` (message index -> its blocks) framed before each such
    message's text (``text_of(content)``: its plain text; by default the content as it is)."""
    out = []
    for index, message in enumerate(messages):
        blocks = blocks_at.get(index)
        if blocks is None:
            out.append(message)
        else:
            content = message.get("content")
            question = text_of(content) if text_of is not None else (content if isinstance(content, str) else "")
            out.append({**message, "content": frame(list(blocks), question)})
    return out


def first_kept(preview_of: Callable[[list[dict]], PromptPreview], messages: list[dict],
               counts: dict[int, int], text_of=None) -> tuple[int | None, PromptPreview | None]:
    """The earliest message with documents (``counts``: message index -> how many) that stays in the context
    with everything after it, framed (the documents' text not yet in), and ``preview_of`` the conversation
    from there (the system message kept); (None, the last preview) when none does. Blocking: tokenizes."""
    system = messages[:1] if messages and messages[0].get("role") == "system" else []
    empty = framed(messages, {index: [""] * count for index, count in counts.items()}, text_of)
    preview = None
    for start in sorted(counts):
        preview = preview_of(system + empty[start:])
        if preview.dropped_messages == 0:
            return start, preview
    return None, preview


def room(preview: PromptPreview, exact: bool) -> int:
    """The tokens the documents' text may take in the prompt ``preview`` measured without it."""
    left = preview.budget - preview.total
    margin = MARGIN_TOKENS + MARGIN_SHARE * left if exact else ESTIMATE_MARGIN_SHARE * left
    return int(left - margin)


def share_room(items: Sequence[tuple[AttachedDocument, str]], tokens: int) -> list[FittedDocument]:
    """Each (document, question) fitted into a share of ``tokens``, smallest document first, each getting an
    equal share of what the ones before it left; in the order given. ``NoRoom`` for the first that cannot
    be fitted. Blocking: tokenizes and indexes the documents."""
    order = sorted(range(len(items)), key=lambda i: items[i][0].document_tokens)
    fitted: dict[int, FittedDocument] = {}
    left = tokens
    for position, index in enumerate(order):
        document, question = items[index]
        share = left // (len(order) - position)
        name = document.document.name
        if share < MIN_ROOM_TOKENS:
            raise NoRoom("no_room", index, name, share)
        result = document.fit(question, share)
        if not result.block:
            raise NoRoom("no_passage", index, name, share)
        fitted[index] = result
        left -= result.block_tokens
    return [fitted[index] for index in range(len(items))]
