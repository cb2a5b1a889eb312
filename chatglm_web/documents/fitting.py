"""What of a document goes into the prompt: all of it when it fits the token budget, else the passages most
relevant to the question; and how much of the document that is.

    attached = AttachedDocument(document, count_tokens)   # once per document a conversation has attached;
                                                          # count_tokens = lambda text: len(tokenizer.encode(text))
    fitted = attached.fit(question, token_budget=6000)    # each question: a FittedDocument
    fit_document(document, question, 6000, count_tokens)  # the same, once (builds the index each call)

``fitted.mode`` is WHOLE or PASSAGES; ``fitted.block`` is the text for the prompt, within ``token_budget``
tokens by ``count_tokens``; ``included_chars`` / ``total_chars`` and ``included_tokens`` / ``total_tokens``
say how much of the document's text it holds; ``suggested_model`` names a longer-context ChatGLM3 when the
document has more than SUGGEST_OVER (4) times the budget's tokens, else None.

The block names the document, then gives its text, with a ``[Page N]`` line where each page begins when
the document has pages:

    Document: report.pdf (PDF, 3 pages)

    [Page 1]
    ...

or, when the whole does not fit, the chosen passages in document order, ``[…]`` between passages that
are not neighbours:

    Document: report.pdf (PDF, 120 pages). It is too long to show whole: below are the 7 passages most
    relevant to the question (6% of its text), in document order.

    [Page 3]
    ...

    […]

    [Pages 7–8]
    ...

When not even one passage fits, ``block`` is "" (and ``passages`` empty). The AttachedDocument keeps the
passage index and the token counts, so each document is split, indexed and counted once.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

from chatglm_web.documents.document import Document
from chatglm_web.documents.retrieval import Passage, PassageIndex

WHOLE = "whole"
PASSAGES = "passages"
SUGGEST_OVER = 4                 # suggest a longer-context model past this many times the budget
#: ChatGLM3 models with longer contexts, shortest first, and their context lengths in tokens.
LONGER_MODELS = (("THUDM/chatglm3-6b-32k", 32_768), ("THUDM/chatglm3-6b-128k", 131_072))
ROOM_FOR_CHAT = 0.8              # a model "fits" a document using at most this share of its context
GAP = "[…]"


@dataclass(frozen=True)
class FittedDocument:
    mode: str                           # WHOLE or PASSAGES
    block: str                          # the text the prompt gets ("" when nothing fits)
    block_tokens: int                   # count_tokens(block)
    passages: tuple[Passage, ...]       # the passages in the block, in document order (empty for WHOLE)
    included_chars: int                 # characters of the document's text in the block
    total_chars: int
    included_tokens: int                # tokens of the document's text in the block (passage by passage)
    total_tokens: int
    suggested_model: str | None = None  # a longer-context model to use instead, when the document is far over

    @property
    def whole(self) -> bool:
        return self.mode == WHOLE

    @property
    def share(self) -> float:
        """The share of the document's characters in the block, 0.0 to 1.0."""
        return self.included_chars / self.total_chars if self.total_chars else 1.0


def suggest_model(document_tokens: int, token_budget: int) -> str | None:
    """A longer-context model for a document of ``document_tokens`` when it is over SUGGEST_OVER times the
    budget: the first of LONGER_MODELS that holds it (with room for the chat), else the longest; only models
    with at least twice the budget as context count (a budget near 32k means that model is in use already)."""
    if document_tokens <= SUGGEST_OVER * token_budget:
        return None
    longer = [(model, context) for model, context in LONGER_MODELS if context >= 2 * token_budget]
    for model, context in longer:
        if document_tokens <= ROOM_FOR_CHAT * context:
            return model
    return longer[-1][0] if longer else None


class AttachedDocument:
    """A document attached to one conversation: its passage index and token counts, made once, used for
    each question. ``count_tokens(text) -> int`` is the model's tokenizer (the budget is in its tokens)."""

    def __init__(self, document: Document, count_tokens: Callable[[str], int]):
        self.document = document
        self.count_tokens = count_tokens
        self._index: PassageIndex | None = None
        self._document_tokens: int | None = None
        self._whole: tuple[str, int] | None = None
        self._passage_tokens: dict[int, int] = {}

    @property
    def index(self) -> PassageIndex:
        if self._index is None:
            self._index = PassageIndex.of(self.document)
        return self._index

    @property
    def document_tokens(self) -> int:
        if self._document_tokens is None:
            self._document_tokens = self.count_tokens(self.document.text)
        return self._document_tokens

    def fit(self, question: str, token_budget: int) -> FittedDocument:
        """The block for ``question`` within ``token_budget`` tokens (module docstring)."""
        if token_budget < 1:
            raise ValueError(f"token_budget must be at least 1, not {token_budget}")
        document = self.document
        total = self.document_tokens
        suggested = suggest_model(total, token_budget)
        if total <= token_budget:
            block, block_tokens = self._whole_block()
            if block_tokens <= token_budget:
                return FittedDocument(WHOLE, block, block_tokens, (), document.chars, document.chars, total, total,
                                      suggested)
        chosen = self._choose(question, token_budget)
        while True:
            block = self._passages_block(chosen) if chosen else ""
            block_tokens = self.count_tokens(block) if block else 0
            if block_tokens <= token_budget:
                break
            chosen = chosen[:-1]                  # the least relevant goes first
        passages = tuple(sorted(chosen, key=lambda passage: passage.index))
        return FittedDocument(PASSAGES, block, block_tokens, passages, sum(len(p.text) for p in passages),
                              document.chars, sum(self._tokens(p) for p in passages), total, suggested)

    def _choose(self, question: str, token_budget: int) -> list[Passage]:
        """The passages that fit next to the header, the most relevant first."""
        overhead = self.count_tokens(f"\n\n{GAP}\n\n[Pages 9999–9999]\n")
        left = token_budget - self.count_tokens(self._header(len(self.index.passages), 1.0))
        chosen = []
        for hit in self.index.ranked(question):
            cost = self._tokens(hit.passage) + overhead
            if cost <= left:
                chosen.append(hit.passage)
                left -= cost
        return chosen

    def _tokens(self, passage: Passage) -> int:
        if passage.index not in self._passage_tokens:
            self._passage_tokens[passage.index] = self.count_tokens(passage.text)
        return self._passage_tokens[passage.index]

    def _whole_block(self) -> tuple[str, int]:
        if self._whole is None:
            document = self.document
            parts = [f"Document: {document.name} ({document.describe()})"]
            bounds = [*document.page_starts, len(document.text)]
            for page, (start, end) in enumerate(itertools.pairwise(bounds), 1):
                if document.text[start:end].strip():
                    parts.append(f"[Page {page}]\n{document.text[start:end].strip()}")
            if not document.page_starts:
                parts.append(document.text)
            block = "\n\n".join(parts)
            self._whole = block, self.count_tokens(block)
        return self._whole

    def _header(self, count: int, share: float) -> str:
        document = self.document
        percent = f"{share:.0%}" if share >= 0.01 else "under 1%"
        return (f"Document: {document.name} ({document.describe()}). It is too long to show whole: below are the "
                f"{count} passage{'s' if count != 1 else ''} most relevant to the question ({percent} of its text), "
                "in document order.")

    def _passages_block(self, chosen: list[Passage]) -> str:
        passages = sorted(chosen, key=lambda passage: passage.index)
        share = sum(len(p.text) for p in passages) / max(1, self.document.chars)
        parts = [self._header(len(passages), share)]
        previous = None
        for passage in passages:
            if previous is not None and passage.index != previous + 1:
                parts.append(GAP)
            label = _page_label(passage)
            parts.append(f"{label}\n{passage.text}" if label else passage.text)
            previous = passage.index
        return "\n\n".join(parts)


def fit_document(document: Document, question: str, token_budget: int,
                 count_tokens: Callable[[str], int]) -> FittedDocument:
    """``AttachedDocument(document, count_tokens).fit(question, token_budget)``: for one question only (an
    attached document should keep its AttachedDocument, which splits, indexes and counts once)."""
    return AttachedDocument(document, count_tokens).fit(question, token_budget)


def _page_label(passage: Passage) -> str:
    if passage.first_page is None:
        return ""
    if passage.last_page in (None, passage.first_page):
        return f"[Page {passage.first_page}]"
    return f"[Pages {passage.first_page}–{passage.last_page}]"
