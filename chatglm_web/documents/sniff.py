"""Which kind of document a file is: its extension says what it claims, its first bytes must agree.

    kind_of("report.pdf")                                -> "pdf"       (by the extension alone)
    check_content("report.pdf", "pdf", data[:HEAD_BYTES])   returns, or DocumentError:
        "notes.pdf is not a PDF (it looks like a Windows program)."

Accepted: .txt / .md (.markdown) / .html (.htm) / .pdf / .docx. A PDF must hold ``%PDF-`` in its first
1024 bytes, a .docx must start as a zip archive (``PK\\x03\\x04``; the worker checks it holds a Word
document), and a text kind must not look binary (a NUL byte, or many control characters, in its first
bytes, without a UTF-16/32 byte order mark). The full text is checked again when it is decoded.
"""

from __future__ import annotations

import codecs
from pathlib import PurePath

from chatglm_web.documents.document import A_KIND, DocumentError

EXTENSIONS = {
    ".txt": "text",
    ".md": "markdown",
    ".markdown": "markdown",
    ".html": "html",
    ".htm": "html",
    ".pdf": "pdf",
    ".docx": "docx",
}
ACCEPTED = ".txt, .md, .pdf, .docx or .html"
HEAD_BYTES = 64 * 1024          # how much of the file the check reads
PDF_HEADER_WITHIN = 1024        # where %PDF- may start (PDF 2.0, 7.5.2: readers accept leading bytes)

#: Signatures of common files, to say what a mismatched file looks like.
SIGNATURES = (
    (b"%PDF-", "a PDF"),
    (b"PK\x03\x04", "a zip archive"),
    (b"PK\x05\x06", "an empty zip archive"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1", "an old Office document (.doc, .xls or .ppt)"),
    (b"MZ", "a Windows program"),
    (b"\x7fELF", "a Linux program"),
    (b"\xcf\xfa\xed\xfe", "a macOS program"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF87a", "a GIF image"),
    (b"GIF89a", "a GIF image"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"Rar!\x1a\x07", "a RAR archive"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive"),
    (b"{\\rtf", "an RTF document"),
)
_TEXT_BOMS = (codecs.BOM_UTF8, codecs.BOM_UTF32_LE, codecs.BOM_UTF32_BE, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)
_ALLOWED_CONTROLS = frozenset(b"\t\n\r\f\v\x1b")
MAX_CONTROL_SHARE = 0.01        # more control bytes than this share of the head: not text


def looks_like(head: bytes) -> str | None:
    """What the first bytes say the file is ('a Windows program'), or None for no known signature."""
    for signature, description in SIGNATURES:
        if head.startswith(signature):
            return description
    return None


def kind_of(filename: str) -> str:
    """The document kind ("text", "markdown", "html", "pdf", "docx") that ``filename``'s extension claims;
    DocumentError("unsupported") for any other extension."""
    name = display_name(filename)
    suffix = PurePath(name).suffix.lower()
    kind = EXTENSIONS.get(suffix)
    if kind is None:
        what = f"{suffix} files" if suffix else "a file without an extension"
        raise DocumentError("unsupported", f"{name}: {what} cannot be attached; attach a {ACCEPTED} file.")
    return kind


def check_content(filename: str, kind: str, head: bytes) -> None:
    """DocumentError("empty" / "wrong_type") unless ``head``, the first bytes of the file (at least
    HEAD_BYTES of them, or all of a smaller file), can start a document of ``kind``."""
    name = display_name(filename)
    if not head:
        raise DocumentError("empty", f"{name} is empty.")
    if kind == "pdf":
        if b"%PDF-" not in head[:PDF_HEADER_WITHIN]:
            raise _wrong_type(name, kind, head)
    elif kind == "docx":
        if not head.startswith(b"PK\x03\x04"):
            hint = " Save it as .docx in Word and attach that." if head.startswith(SIGNATURES[3][0]) else ""
            raise _wrong_type(name, kind, head, hint)
    elif looks_binary(head):
        raise _wrong_type(name, kind, head)


def looks_binary(head: bytes) -> bool:
    """True when ``head`` cannot be the start of a text file: a NUL byte, or more than 1% control bytes,
    unless it starts with a UTF-16/32 byte order mark (whose text has NUL bytes)."""
    if head.startswith(_TEXT_BOMS):
        return False
    if b"\x00" in head:
        return True
    controls = sum(1 for byte in head if byte < 0x20 and byte not in _ALLOWED_CONTROLS)
    return controls > MAX_CONTROL_SHARE * len(head)


def display_name(filename: str) -> str:
    """The file's own name (no folders), as messages show it; control characters removed, 120 characters
    at most (a name comes from the browser: it may be anything)."""
    name = PurePath(str(filename).replace("\\", "/")).name
    name = "".join(ch for ch in name if ch.isprintable()).strip()
    if len(name) > 120:
        stem, dot, suffix = name.rpartition(".")
        name = (stem[:100] + "…" + dot + suffix[:15]) if dot and len(suffix) <= 15 else name[:119] + "…"
    return name or "the document"


def _wrong_type(name: str, kind: str, head: bytes, hint: str = "") -> DocumentError:
    seen = looks_like(head)
    if seen:
        what = f"it looks like {seen}"
    elif kind in ("pdf", "docx"):
        what = f"its content is not in the {'PDF' if kind == 'pdf' else '.docx'} format"
    else:
        what = "its content is binary, not text"
    return DocumentError("wrong_type", f"{name} is not {A_KIND[kind]} ({what}).{hint}")
