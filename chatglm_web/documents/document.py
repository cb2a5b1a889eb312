"""What reading a document gives: ``Document``, or ``DocumentError`` with a message for the user."""

from __future__ import annotations

import bisect
from dataclasses import dataclass

#: The kinds of document, and how a message names each.
KIND_NAMES = {
    "text": "text file",
    "markdown": "Markdown file",
    "html": "HTML page",
    "pdf": "PDF",
    "docx": "Word document",
}
A_KIND = {"text": "a text file", "markdown": "a Markdown file", "html": "an HTML page", "pdf": "a PDF",
          "docx": "a Word document"}


class DocumentError(ValueError):
    """A document that is not read; ``str(error)`` is one sentence for the user, naming the file and, for a
    cap, its number. ``reason`` says which: "unsupported", "unreadable", "too_large", "empty", "wrong_type",
    "not_text", "encrypted", "damaged", "pages", "chars", "bomb", "time", "memory", "no_text", "crashed",
    "busy" (extract.py says when each happens)."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Document:
    """A document's extracted text. ``pages`` is the page count of a PDF and None for kinds without pages;
    ``page_starts[i]`` is where page i + 1 begins in ``text`` (empty without pages)."""

    name: str
    kind: str                       # a key of KIND_NAMES
    pages: int | None
    text: str
    chars: int
    page_starts: tuple[int, ...] = ()

    def page_at(self, offset: int) -> int | None:
        """The 1-based page holding ``text[offset]``, or None for a kind without pages."""
        if not self.page_starts:
            return None
        return max(1, bisect.bisect_right(self.page_starts, offset))

    def describe(self) -> str:
        """'PDF, 12 pages' / 'Word document': how a prompt or a message names the document's kind."""
        kind = KIND_NAMES.get(self.kind, self.kind)
        if self.pages is None:
            return kind
        return f"{kind}, {self.pages} page{'s' if self.pages != 1 else ''}"
