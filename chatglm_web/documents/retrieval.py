"""The passages of a long document most relevant to a question: paragraphs grouped into passages, BM25 over them.

    passages = split_passages(document)        # ~TARGET_TOKENS each, in document order, positions kept
    index = PassageIndex(passages)             # build once per attached document (a conversation keeps it)
    index.top_passages("When did the bridge open?", k=5)                              best first
    index.top_passages(question, token_budget=3000, count_tokens=count, overhead=8)   as many as fit

Splitting: each non-blank line is a unit (a paragraph of a .docx, HTML page or unwrapped text; a line of
a PDF or of hard-wrapped text). Units are grouped in order; a passage ends at a paragraph break (a blank
line) once it has TARGET_TOKENS, at any line once the next would take it past MAX_TOKENS, and where a new
page begins (so that a passage names one page). A unit longer
than MAX_TOKENS is cut at sentence ends (. ! ? 。！？；), and a sentence longer still at a space (or
anywhere, for Chinese). Sizes are estimated without a tokenizer (``estimate_tokens``): one token per
Chinese / Japanese / Korean character, one per four other characters.

Terms (``terms``): text is NFKC-normalised and case-folded; Latin, Cyrillic, Greek... letters and digits make
words (a final plural "s" dropped: "bridges" = "bridge"); Chinese, Japanese and Korean characters, written
without spaces between words, make one term per character and one per pair of neighbouring characters, so
"长江大桥" matches "大桥" without a word list. Scores are Okapi BM25 (k1 = 1.2, b = 0.75); no network, no
model. Passages that score the same (no question term at all, say "summarise this") rank in document
order, so a budget is always filled from the most relevant passages, then from the document's beginning.
"""

from __future__ import annotations

import itertools
import math
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import NamedTuple

from chatglm_web.documents.document import Document

TARGET_TOKENS = 250
MAX_TOKENS = 400
K1 = 1.2
B = 0.75

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af\U00020000-\U0002ebef"
_TERM = re.compile(f"([{_CJK}]+)|([^\\W_{_CJK}]+)")
_CJK_CHAR = re.compile(f"[{_CJK}]")
_SENTENCE_END = re.compile(r"(?<=[.!?。！？；])\s*")


@dataclass(frozen=True)
class Passage:
    """``text`` is ``document.text[start:end]``; pages are 1-based, None for a document without pages."""

    index: int              # its place in document order
    start: int
    end: int
    text: str
    first_page: int | None = None
    last_page: int | None = None


class Hit(NamedTuple):
    passage: Passage
    score: float


def estimate_tokens(text: str) -> int:
    """About how many tokens ``text`` is, without a tokenizer: CJK characters + a quarter of the others."""
    cjk = len(_CJK_CHAR.findall(text))
    return cjk + math.ceil((len(text) - cjk) / 4)


def terms(text: str) -> list[str]:
    """The BM25 terms of ``text`` (module docstring): words, CJK characters and CJK character pairs."""
    found: list[str] = []
    for cjk, word in _TERM.findall(unicodedata.normalize("NFKC", text).casefold()):
        if cjk:
            found.extend(cjk)
            found.extend(cjk[i:i + 2] for i in range(len(cjk) - 1))
        elif len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            found.append(word[:-1])
        else:
            found.append(word)
    return found


# -- passages ------------------------------------------------------------------------------------

def split_passages(document: Document, target: int = TARGET_TOKENS, most: int = MAX_TOKENS) -> list[Passage]:
    """``document.text`` as passages of about ``target`` (at most ``most``) estimated tokens, in order."""
    text = document.text
    passages: list[Passage] = []
    start = end = size = 0
    for unit_start, unit_end, paragraph in _units(text, most):
        unit = estimate_tokens(text[unit_start:unit_end])
        new_page = document.page_at(unit_start) != document.page_at(start)
        if size and (new_page or size + unit > target and (paragraph or size + unit > most)):
            passages.append(_passage(document, len(passages), start, end))
            size = 0
        if not size:
            start = unit_start
        end = unit_end
        size += unit
    if size:
        passages.append(_passage(document, len(passages), start, end))
    return passages


def _passage(document: Document, index: int, start: int, end: int) -> Passage:
    return Passage(index, start, end, document.text[start:end], document.page_at(start), document.page_at(end - 1))


def _units(text: str, most: int) -> Iterator[tuple[int, int, bool]]:
    """(start, end, starts a paragraph) of each non-blank line, lines over ``most`` tokens cut in pieces."""
    previous_end = 0
    for line in re.finditer(r"[^\n]+", text):
        start, end = line.span()
        stripped = line.group().strip()
        if not stripped:
            continue
        start += len(line.group()) - len(line.group().lstrip())
        end -= len(line.group()) - len(line.group().rstrip())
        paragraph = text.count("\n", previous_end, start) >= 2 or previous_end == 0
        previous_end = end
        for i, (piece_start, piece_end) in enumerate(_pieces(text, start, end, most)):
            yield piece_start, piece_end, paragraph and i == 0


def _pieces(text: str, start: int, end: int, most: int) -> Iterator[tuple[int, int]]:
    """``text[start:end]`` cut into pieces of at most ``most`` estimated tokens: whole sentences, as many
    as fit together; a sentence longer than that is cut by ``_hard_cuts``."""
    if estimate_tokens(text[start:end]) <= most:
        yield start, end
        return
    bounds = sorted({start, end, *(m.end() for m in _SENTENCE_END.finditer(text, start, end)
                                   if start < m.end() < end)})
    piece: list[int] | None = None              # [start, end] of the piece being gathered
    for sentence_start, sentence_end in itertools.pairwise(bounds):
        if estimate_tokens(text[sentence_start:sentence_end]) > most:
            if piece:
                yield piece[0], piece[1]
                piece = None
            yield from _hard_cuts(text, sentence_start, sentence_end, most)
        elif piece and estimate_tokens(text[piece[0]:sentence_end]) > most:
            yield piece[0], piece[1]
            piece = [sentence_start, sentence_end]
        elif piece:
            piece[1] = sentence_end
        else:
            piece = [sentence_start, sentence_end]
    if piece:
        yield piece[0], piece[1]


def _hard_cuts(text: str, start: int, end: int, most: int) -> Iterator[tuple[int, int]]:
    """Pieces of at most ``most`` estimated tokens, each cut at its last space when that is past its middle."""
    while start < end:
        low, high = start + 1, min(end, start + 4 * most)      # `most` tokens are at most 4 * most characters
        while low < high:
            middle = (low + high + 1) // 2
            if estimate_tokens(text[start:middle]) <= most:
                low = middle
            else:
                high = middle - 1
        cut = low
        if cut < end:
            space = text.rfind(" ", start + 1, cut)
            if space > start + (cut - start) // 2:
                cut = space
        yield start, cut
        start = cut
        while start < end and text[start].isspace():
            start += 1


# -- the index -----------------------------------------------------------------------------------

class PassageIndex:
    """BM25 over passages. ``PassageIndex.of(document)`` splits and indexes a document."""

    def __init__(self, passages: list[Passage]):
        self.passages = tuple(passages)
        self._postings: dict[str, list[tuple[int, int]]] = {}
        self._lengths: list[int] = []
        for i, passage in enumerate(self.passages):
            counts = Counter(terms(passage.text))
            self._lengths.append(sum(counts.values()))
            for term, count in counts.items():
                self._postings.setdefault(term, []).append((i, count))
        self._average = (sum(self._lengths) / len(self._lengths)) if self._lengths else 1.0

    @classmethod
    def of(cls, document: Document) -> PassageIndex:
        return cls(split_passages(document))

    def scores(self, question: str) -> list[float]:
        """The BM25 score of each passage (in document order) for ``question``."""
        n = len(self.passages)
        scores = [0.0] * n
        for term in set(terms(question)):
            posting = self._postings.get(term)
            if not posting:
                continue
            idf = math.log(1 + (n - len(posting) + 0.5) / (len(posting) + 0.5))
            for i, count in posting:
                length = self._lengths[i] / self._average
                scores[i] += idf * count * (K1 + 1) / (count + K1 * (1 - B + B * length))
        return scores

    def ranked(self, question: str) -> list[Hit]:
        """Every passage, the most relevant first (ties in document order)."""
        scores = self.scores(question)
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
        return [Hit(self.passages[i], scores[i]) for i in order]

    def top_passages(self, question: str, *, k: int | None = None, token_budget: int | None = None,
                     count_tokens: Callable[[str], int] = estimate_tokens, overhead: int = 0) -> list[Hit]:
        """The most relevant passages, best first: the first ``k``, and/or as many as fit ``token_budget``
        when each costs ``count_tokens(passage.text) + overhead`` (a passage that does not fit is skipped
        for a smaller one further down)."""
        if k is None and token_budget is None:
            raise ValueError("top_passages needs k or token_budget")
        hits = self.ranked(question)
        if k is not None:
            hits = hits[:max(0, k)]
        if token_budget is None:
            return hits
        chosen, left = [], token_budget
        for hit in hits:
            cost = count_tokens(hit.passage.text) + overhead
            if cost <= left:
                chosen.append(hit)
                left -= cost
        return chosen
