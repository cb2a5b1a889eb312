"""The text of a document's bytes, one parser per kind. These run inside the worker process only (worker.py),
under its memory and time limits: a malicious file may make them fail, never the server.

    parse("pdf", data, limits) -> Parsed(text, pages, page_starts)      or raises Refusal(reason, detail)

- text / Markdown: decoded as UTF-8 (a BOM is dropped), UTF-16/32 with a BOM, else GB18030 (the Chinese
  standard, a superset of GBK and GB2312); anything else, or text with NUL / many control characters, is
  refused as not text. Markdown is kept as written.
- HTML: decoded the same way (a ``<meta charset>`` in the first 1024 bytes is tried before GB18030), then
  the standard library's html.parser; the content of script, style, noscript and template elements is
  dropped, block elements end lines, whitespace is collapsed outside ``<pre>``.
- PDF: pypdf. An encrypted PDF is read when it opens with the empty password (permissions-only
  encryption), refused otherwise. The page tree is counted before pypdf walks it (a tree of shared
  nodes can claim billions of pages). Pages are joined by a blank line; ``page_starts`` keeps where each
  begins.
- .docx: the zip's declared sizes, member count and packing ratios are checked first (limits.py), then
  each member is unpacked in 64 KiB reads to check it holds no more than it declares (a member that lies
  fails its CRC: "damaged"), then python-docx reads the body's paragraphs and tables in order (a table row
  as its cells joined by " | ").

Every parser stops as soon as the text passes ``limits.chars``. A parser refuses with ``Refusal``; any other
exception from pypdf / python-docx / lxml means a damaged file, MemoryError the memory limit (worker.py).
"""

from __future__ import annotations

import codecs
import io
import re
import zipfile
import zlib
from dataclasses import dataclass
from html.parser import HTMLParser

from chatglm_web.documents.limits import Limits, mebibytes


class Refusal(Exception):
    """The parser refuses the document: ``reason`` is a DocumentError reason, ``detail`` a short fact."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Parsed:
    text: str
    pages: int | None = None
    page_starts: tuple[int, ...] = ()


def parse(kind: str, data: bytes, limits: Limits) -> Parsed:
    parser = {"text": parse_text, "markdown": parse_text, "html": parse_html, "pdf": parse_pdf,
              "docx": parse_docx}[kind]
    return parser(data, limits)


# -- text ----------------------------------------------------------------------------------------

_BOMS = ((codecs.BOM_UTF8, "utf-8-sig"), (codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
         (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
_CONTROLS = re.compile("[\x00-\x08\x0e-\x1a\x1c-\x1f\x7f-\x9f]")   # C0 and C1, without \t \n \v \f \r ESC
MAX_CONTROL_SHARE = 0.01


def decode(data: bytes, declared: str | None = None) -> str:
    """``data`` as text, normalised to \\n line ends; Refusal("not_text") when it is not text."""
    for bom, encoding in _BOMS:
        if data.startswith(bom):
            candidates = [encoding]
            break
    else:
        candidates = ["utf-8", *([declared] if declared else []), "gb18030"]
    for encoding in candidates:
        try:
            text = data.decode(encoding)
        except (UnicodeDecodeError, LookupError):
            continue
        break
    else:
        raise Refusal("not_text", "it is neither UTF-8 nor GB18030")
    if "\x00" in text:
        raise Refusal("not_text", "it holds NUL characters")
    if len(_CONTROLS.findall(text)) > MAX_CONTROL_SHARE * len(text):
        raise Refusal("not_text", "it holds many control characters")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def parse_text(data: bytes, limits: Limits) -> Parsed:
    text = decode(data)
    _check_chars(len(text), limits)
    return Parsed(text.strip("\n"))


# -- HTML ----------------------------------------------------------------------------------------

_META_CHARSET = re.compile(rb"""<meta[^>]+charset\s*=\s*["']?\s*([A-Za-z0-9_.:-]{1,40})""", re.IGNORECASE)


class _HTMLText(HTMLParser):
    """Collects the text of an HTML page, without script / style / noscript / template content."""

    SKIPPED = frozenset({"script", "style", "noscript", "template"})
    BLOCKS = frozenset({
        "address", "article", "aside", "blockquote", "caption", "dd", "details", "div", "dl", "dt",
        "fieldset", "figcaption", "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header",
        "hr", "li", "main", "nav", "ol", "p", "pre", "section", "summary", "table", "title", "tr", "ul",
    })
    CELLS = frozenset({"td", "th"})

    def __init__(self, limits: Limits):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.visible = 0            # characters other than whitespace: the text will have at least these
        self.limits = limits
        self.skipping = 0
        self.pre = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIPPED:
            self.skipping += 1
        elif tag == "br":
            self._add("\n")
        elif tag in self.CELLS:
            self._add(" | ")
        elif tag in self.BLOCKS:
            self._add("\n\n")
            self.pre += tag == "pre"

    def handle_startendtag(self, tag, attrs):
        if tag in ("br", "hr"):
            self._add("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIPPED:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCKS:
            self._add("\n\n")
            if tag == "pre":
                self.pre = max(0, self.pre - 1)

    def handle_data(self, data):
        if self.skipping:
            return
        self.visible += len("".join(data.split()))
        _check_chars(self.visible, self.limits)
        self._add(data if self.pre else re.sub(r"\s+", " ", data))

    def _add(self, text: str) -> None:
        self.parts.append(text)

    def text(self) -> str:
        return _tidy("".join(self.parts))


def _tidy(text: str) -> str:
    """Lines stripped of edge spaces, at most one blank line in a row, no cell separator at a line start."""
    lines = [line.strip().removeprefix("| ").strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip("\n")


def parse_html(data: bytes, limits: Limits) -> Parsed:
    declared = _META_CHARSET.search(data[:1024])
    text = decode(data, declared.group(1).decode("ascii") if declared else None)
    parser = _HTMLText(limits)
    parser.feed(text)
    parser.close()
    result = parser.text()
    _check_chars(len(result), limits)
    return Parsed(result)


# -- PDF -----------------------------------------------------------------------------------------

PAGE_TREE_DEPTH = 64     # deeper than any real page tree; a loop in the tree gets here too


def parse_pdf(data: bytes, limits: Limits) -> Parsed:
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError, LimitReachedError

    try:
        reader = PdfReader(io.BytesIO(data), strict=False)
        if reader.is_encrypted:
            try:
                opened = reader.decrypt("")
            except (DependencyError, NotImplementedError):
                opened = 0
            if not opened:
                raise Refusal("encrypted")
        count_pdf_pages(reader, limits.pages)
        texts: list[str] = []
        starts: list[int] = []
        size = 0
        for page in reader.pages:
            starts.append(size + (2 if texts else 0))
            text = (page.extract_text() or "").replace("\r\n", "\n").replace("\r", "\n").strip("\n")
            texts.append(text)
            size = starts[-1] + len(text)
            _check_chars(size, limits)
    except FileNotDecryptedError:
        raise Refusal("encrypted") from None
    except LimitReachedError as error:
        raise Refusal("bomb", f"the PDF reader stopped at one of its safety limits ({short(error)})") from None
    return Parsed("\n\n".join(texts), len(texts), tuple(starts))


def count_pdf_pages(reader, max_pages: int) -> int:
    """The number of pages in ``reader``'s page tree, counted without following it past ``max_pages``
    leaves or PAGE_TREE_DEPTH levels: Refusal("pages", "more than N") or Refusal("damaged") past those."""
    from pypdf.generic import ArrayObject, DictionaryObject

    root = reader.trailer["/Root"].get_object()
    stack = [(root["/Pages"], 0)]
    pages = 0
    visits = 0
    while stack:
        node, depth = stack.pop()
        visits += 1
        if depth > PAGE_TREE_DEPTH or visits > 4 * max_pages + 1000:
            raise Refusal("damaged", "its page tree is nested too deeply or loops")
        node = node.get_object()
        if not isinstance(node, DictionaryObject):
            raise Refusal("damaged", "its page tree holds something that is not a page")
        kids = node.get("/Kids")
        if node.get("/Type") == "/Pages" or kids is not None:
            kids = kids.get_object() if kids is not None else []
            if not isinstance(kids, ArrayObject):
                raise Refusal("damaged", "its page tree is malformed")
            stack.extend((kid, depth + 1) for kid in reversed(kids))
        else:
            pages += 1
            if pages > max_pages:
                raise Refusal("pages", f"more than {max_pages:,}")
    return pages


# -- .docx ---------------------------------------------------------------------------------------

MEMBER_READ_BYTES = 64 * 1024


def check_zip(data: bytes, limits: Limits) -> zipfile.ZipFile:
    """The .docx as an open ZipFile once its declared sizes pass limits.py's zip caps (read from the central
    directory, before anything is unpacked) and each member unpacks to what it declares; Refusal otherwise."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        members = archive.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, EOFError, OSError) as error:
        raise Refusal("damaged", short(error)) from None
    if len(members) > limits.zip_members:
        raise Refusal("bomb", f"it holds {len(members):,} files, over the limit of {limits.zip_members:,}")
    unpacked = sum(member.file_size for member in members)
    if unpacked > limits.unzipped_bytes:
        raise Refusal("bomb", f"its parts would unpack to {mebibytes(unpacked)}, over the limit of "
                              f"{mebibytes(limits.unzipped_bytes)}")
    for member in members:
        ratio = member.file_size / max(member.compress_size, 1)
        if member.file_size > limits.zip_ratio_from and ratio > limits.zip_ratio:
            raise Refusal("bomb", f"a part of it is packed {ratio:,.0f}:1, over the limit of {limits.zip_ratio}:1")
    names = {member.filename for member in members}
    if "[Content_Types].xml" not in names or not any(name.startswith("word/") for name in names):
        raise Refusal("wrong_type", "it is a zip archive, not a Word document")
    for member in members:
        _check_member(archive, member)
    return archive


def _check_member(archive: zipfile.ZipFile, member: zipfile.ZipInfo) -> None:
    """Unpacks ``member`` in small reads, to nowhere: zipfile stops each read at the declared size and checks
    the CRC at the end, so a member that unpacks to more than it declares fails here, having cost one read
    more than its declared size. (zipfile's ``read()`` of a whole member would first inflate all of it,
    whatever it declares.)"""
    try:
        with archive.open(member) as unpacked:
            while unpacked.read(MEMBER_READ_BYTES):
                pass
    except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError, ValueError) as error:
        raise Refusal("damaged", f"its part {member.filename[:80]} is damaged or unpacks to more than it "
                                 f"declares: {short(error)}") from None


def parse_docx(data: bytes, limits: Limits) -> Parsed:
    check_zip(data, limits).close()
    import docx
    from docx.table import Table

    try:
        document = docx.Document(io.BytesIO(data))
    except ValueError as error:
        if "not a Word file" in str(error):
            raise Refusal("wrong_type", "it is an Office file, but not a Word document") from None
        raise
    blocks: list[str] = []
    size = 0
    for block in document.iter_inner_content():
        text = _table_text(block) if isinstance(block, Table) else block.text
        blocks.append(text)
        size += len(text) + 1
        _check_chars(size, limits)
    text = "\n".join(blocks)
    return Parsed(re.sub(r"\n{3,}", "\n\n", text).strip("\n"))


def _table_text(table) -> str:
    rows = []
    for row in table.rows:
        cells: list[str] = []
        for cell in row.cells:                      # a merged cell comes once per grid column it spans
            text = " ".join(cell.text.split())
            if not cells or cells[-1] != text:
                cells.append(text)
        rows.append(" | ".join(cells))
    return "\n".join(rows)


# -- shared --------------------------------------------------------------------------------------

def _check_chars(chars: int, limits: Limits) -> None:
    if chars > limits.chars:
        raise Refusal("chars", f"more than {limits.chars:,}")


def short(error: BaseException, limit: int = 160) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 1] + "…"
