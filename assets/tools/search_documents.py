"""Local search: the best passages for a query in the text files of one folder.

The folder is ``$CHATGLM_WEB_SEARCH_DIR`` or ``assets/search_docs/``. Only regular text files
inside it are read (``.txt``, ``.md``, ``.markdown``, ``.rst``; hidden ones skipped); a symlink
that leads out of the folder is ignored, symlinked folders are not entered. Files, bytes per file
and total text are bounded, so a huge folder costs a bounded time.

Ranking is BM25 over passages (paragraphs, long ones cut). Latin-script words are matched as
words (case-folded, a plural "s" dropped); Chinese, Japanese and Korean text has no spaces, so a
query's CJK runs become character bigrams (a single character stays a unigram) that are counted
as substrings of the passage. A passage holding the whole query gets a bonus.
"""

from __future__ import annotations

import codecs
import math
import os
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

NAME = "search_documents"
DESCRIPTION = ("Search the local document collection (notes, policies, FAQs; English and Chinese) for "
               "passages about a query. Returns the best matching passages with their file names.")
PARAMETERS = {
    "type": "object",
    "properties": {
        "query": {"type": "string", "minLength": 1, "maxLength": 200,
                  "description": "words or a question to look for, in any language"},
        "max_results": {"type": "integer", "minimum": 1, "maximum": 10,
                        "description": "how many passages to return (default 3)"},
    },
    "required": ["query"],
    "additionalProperties": False,
}

ENV_FOLDER = "CHATGLM_WEB_SEARCH_DIR"
DEFAULT_FOLDER = Path(__file__).resolve().parent.parent / "search_docs"
TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst"}
MAX_FILES = 300
MAX_FILE_BYTES = 1_000_000       # read at most this much of each file
MAX_TOTAL_CHARS = 5_000_000      # stop reading files beyond this
MAX_QUERY_TERMS = 64
PASSAGE_CHARS = 600
SNIPPET_CHARS = 300
PER_FILE = 2                     # passages from one file in the results, at most
K1, B = 1.2, 0.75                # BM25
PHRASE_BONUS = 2.0

CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff"
TOKEN = re.compile(f"([{CJK}]+)|([^\\W_{CJK}]+)")
STOP_WORDS = frozenset("a an and are as at be by can do does for from how i in is it me my of on or "
                       "the this to was what when where which who why with you your".split())


def search_folder() -> Path:
    return Path(os.environ.get(ENV_FOLDER) or DEFAULT_FOLDER)


# ---- reading the folder ---------------------------------------------------------------------

def document_files(root: Path) -> list[Path]:
    """Text files inside ``root`` (its real path), by name; symlinks out of it are left out."""
    real_root = root.resolve()
    found: list[Path] = []
    for folder, subfolders, names in os.walk(real_root, followlinks=False):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(names):
            path = Path(folder) / name
            if name.startswith(".") or path.suffix.lower() not in TEXT_SUFFIXES:
                continue
            real = path.resolve()
            if not real.is_relative_to(real_root) or not real.is_file():
                continue
            found.append(path)
            if len(found) >= MAX_FILES:
                return found
    return found


def read_text(path: Path) -> str:
    """The first ``MAX_FILE_BYTES`` of a file: UTF-8 (a cut-off last character dropped), else GB18030."""
    with open(path.resolve(), "rb") as file:
        data = file.read(MAX_FILE_BYTES)
    try:
        return codecs.getincrementaldecoder("utf-8")().decode(data, final=False)
    except UnicodeDecodeError:
        return data.decode("gb18030", errors="replace")


@dataclass
class Passage:
    file: str
    line: int
    text: str
    normalized: str
    words: Counter


def normalize(text: str) -> str:
    return unicodedata.normalize("NFKC", text).casefold()


def stem(word: str) -> str:
    return word[:-1] if len(word) > 3 and word.endswith("s") and not word.endswith("ss") else word


def words_of(normalized: str) -> Counter:
    return Counter(stem(m.group(2)) for m in TOKEN.finditer(normalized) if m.group(2))


def passages_of(text: str, file: str) -> list[Passage]:
    """Paragraphs (split on blank lines; a heading or other one under 40 characters joins the next), long ones
    cut into pieces of about ``PASSAGE_CHARS``."""
    pieces: list[tuple[int, str]] = []
    pending, pending_line = "", 1
    for match in re.finditer(r"\S(?:.|\n(?![ \t]*\n))*", text):
        paragraph, line = match.group(0).strip(), text.count("\n", 0, match.start()) + 1
        if pending:
            paragraph, line = pending + "\n" + paragraph, pending_line
        if len(paragraph) < 40:
            pending, pending_line = paragraph, line
            continue
        pending = ""
        for start in range(0, len(paragraph), PASSAGE_CHARS):
            pieces.append((line + paragraph.count("\n", 0, start), paragraph[start:start + PASSAGE_CHARS]))
    if pending:
        pieces.append((pending_line, pending))
    return [Passage(file, line, piece, normalize(piece), words_of(normalize(piece))) for line, piece in pieces]


# ---- the query ------------------------------------------------------------------------------

def query_terms(query: str) -> tuple[list[str], list[str]]:
    """(words, CJK grams) of the query; stop words are dropped unless nothing else is left."""
    words: list[str] = []
    grams: list[str] = []
    for match in TOKEN.finditer(normalize(query)):
        if match.group(1):
            run = match.group(1)
            grams += [run] if len(run) == 1 else [run[i:i + 2] for i in range(len(run) - 1)]
        else:
            words.append(stem(match.group(2)))
    content_words = [w for w in words if w not in STOP_WORDS]
    words = list(dict.fromkeys(content_words or words))
    grams = list(dict.fromkeys(grams))
    return words[:MAX_QUERY_TERMS], grams[:MAX_QUERY_TERMS - min(len(words), MAX_QUERY_TERMS)]


def term_count(passage: Passage, term: str, is_word: bool) -> int:
    return passage.words.get(term, 0) if is_word else passage.normalized.count(term)


def rank(passages: list[Passage], query: str) -> list[tuple[float, Passage, str]]:
    """(score, passage, its best matching term) for every passage that matches, best first."""
    words, grams = query_terms(query)
    terms = [(w, True) for w in words] + [(g, False) for g in grams]
    if not terms or not passages:
        return []
    counts = [[term_count(p, t, is_word) for t, is_word in terms] for p in passages]
    total = len(passages)
    average = sum(len(p.normalized) for p in passages) / total
    idf = [math.log(1 + (total - df + 0.5) / (df + 0.5))
           for df in (sum(1 for row in counts if row[i]) for i in range(len(terms)))]
    phrase = re.sub(r"[\s\W_]+", "", normalize(query))
    ranked = []
    for passage, row in zip(passages, counts):
        if not any(row):
            continue
        norm = K1 * (1 - B + B * len(passage.normalized) / average)
        parts = [idf[i] * tf * (K1 + 1) / (tf + norm) for i, tf in enumerate(row)]
        score = sum(parts)
        if len(phrase) > 1 and phrase in re.sub(r"[\s\W_]+", "", passage.normalized):
            score += PHRASE_BONUS
        best = max(range(len(terms)), key=lambda i: parts[i])
        ranked.append((score, passage, terms[best][0]))
    ranked.sort(key=lambda r: (-r[0], r[1].file, r[1].line))
    return ranked


def snippet(passage: Passage, term: str) -> str:
    """At most ``SNIPPET_CHARS`` of the passage around the first place ``term`` occurs."""
    text = re.sub(r"\s+", " ", passage.text).strip()
    if len(text) <= SNIPPET_CHARS:
        return text
    at = max(0, normalize(text).find(term))  # NFKC may shift positions a little: fine for a window
    start = max(0, min(at - SNIPPET_CHARS // 3, len(text) - SNIPPET_CHARS))
    cut = text[start:start + SNIPPET_CHARS]
    return ("…" if start else "") + cut + ("…" if start + SNIPPET_CHARS < len(text) else "")


# ---- the tool -------------------------------------------------------------------------------

def search(query: str, folder: Path, max_results: int = 3) -> dict:
    if not folder.is_dir():
        raise FileNotFoundError(f"the document folder does not exist: {folder}")
    files = document_files(folder)
    passages: list[Passage] = []
    total_chars = 0
    for path in files:
        if total_chars >= MAX_TOTAL_CHARS:
            break
        text = read_text(path)[:MAX_TOTAL_CHARS - total_chars]
        total_chars += len(text)
        passages += passages_of(text, path.relative_to(folder.resolve()).as_posix())
    results, per_file = [], Counter()
    for score, passage, term in rank(passages, query):
        if per_file[passage.file] >= PER_FILE:
            continue
        per_file[passage.file] += 1
        results.append({"file": passage.file, "line": passage.line, "score": round(score, 3),
                        "snippet": snippet(passage, term)})
        if len(results) >= max_results:
            break
    answer = {"query": query, "files_searched": len(files), "results": results}
    if not results:
        answer["note"] = "no document matches the query"
    return answer


def run(query: str, max_results: int = 3) -> dict:
    if not isinstance(query, str) or not query.strip():
        raise ValueError("the query is empty")
    max_results = max(1, min(int(max_results), PARAMETERS["properties"]["max_results"]["maximum"]))
    return search(query, search_folder(), max_results)
