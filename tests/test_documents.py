"""Chat with a document (chatglm_web.documents): real .txt / .md / .html / .pdf / .docx files made here and read
back; refusals with their messages (wrong types, caps, encrypted, damaged, zip and PDF bombs, time and memory
limits) that come quickly and leave this process as it was; passages and BM25 retrieval in English and
Chinese; what of a document goes into the prompt for a token budget."""

from __future__ import annotations

import io
import itertools
import random
import re
import resource
import struct
import zipfile
import zlib

import psutil
import pytest

from chatglm_web.documents import (
    LIMITS,
    AttachedDocument,
    Document,
    DocumentError,
    Limits,
    PassageIndex,
    extract,
    fit_document,
    split_passages,
)
from chatglm_web.documents.fitting import PASSAGES, WHOLE, suggest_model
from chatglm_web.documents.retrieval import MAX_TOKENS, estimate_tokens, terms

MiB = 1 << 20


# -- making files -------------------------------------------------------------------------------------------------

def raw_pdf(objects: list[bytes]) -> bytes:
    """A PDF of ``objects`` (object 1 is the catalog), with a correct cross-reference table."""
    out = io.BytesIO()
    out.write(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n%s\nendobj\n" % (number, body))
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    out.write(b"".join(b"%010d 00000 n \n" % offset for offset in offsets))
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return out.getvalue()


HELVETICA = b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding /WinAnsiEncoding >>"


def pdf_stream(data: bytes, entries: bytes = b"") -> bytes:
    return b"<< /Length %d %s >>\nstream\n%s\nendstream" % (len(data), entries, data)


def text_pdf(pages: list[str]) -> bytes:
    """A PDF with one page per string, its lines drawn in Helvetica (so any PDF reader gets the text back)."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"", HELVETICA]
    kids = []
    for text in pages:
        lines = [line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") for line in text.split("\n")]
        content = "BT /F1 11 Tf 14 TL 50 750 Td\n" + "".join(f"({line}) Tj T*\n" for line in lines) + "ET"
        objects.append(pdf_stream(content.encode("latin-1")))
        objects.append(b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 3 0 R >> >> "
                       b"/Contents %d 0 R >>" % len(objects))
        kids.append(len(objects))
    objects[1] = b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join(b"%d 0 R" % k for k in kids), len(kids))
    return raw_pdf(objects)


def one_page_pdf(content_stream: bytes) -> bytes:
    """A PDF of one page drawn by ``content_stream`` (with a font, so that text extraction reads the stream)."""
    page = (b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Resources << /Font << /F1 5 0 R >> >> "
            b"/Contents 4 0 R >>")
    return raw_pdf([b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>", page,
                    content_stream, HELVETICA])


def zeros_deflated(size: int, wbits: int) -> bytes:
    """``size`` zero bytes, compressed (zlib format for wbits 15, raw deflate for -15) without holding them."""
    compressor = zlib.compressobj(1, zlib.DEFLATED, wbits)
    chunk = bytes(MiB)
    return b"".join(compressor.compress(chunk) for _ in range(size // MiB)) + compressor.flush()


def docx_bytes(paragraphs: list[str], table: list[list[str]] | None = None, after: list[str] = ()) -> bytes:
    import docx

    document = docx.Document()
    for text in paragraphs:
        document.add_paragraph(text)
    if table:
        grid = document.add_table(rows=len(table), cols=len(table[0]))
        for row, values in zip(grid.rows, table):
            for cell, value in zip(row.cells, values):
                cell.text = value
    for text in after:
        document.add_paragraph(text)
    out = io.BytesIO()
    document.save(out)
    return out.getvalue()


def with_member(docx: bytes, name: str, chunks, replace: bool = False) -> bytes:
    """``docx`` with the member ``name`` written from ``chunks`` (bytes, streamed; deflated at level 1)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(docx)) as source, \
            zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as target:
        for info in source.infolist():
            if not (replace and info.filename == name):
                target.writestr(info, source.read(info))
        with target.open(name, "w") as member:
            for chunk in chunks:
                member.write(chunk)
    return out.getvalue()


def declare_size(archive: bytes, name: str, size: int) -> bytes:
    """``archive`` with member ``name`` declaring ``size`` unpacked bytes (in its central directory entry and
    its local header) whatever it really holds."""
    data = bytearray(archive)
    end = data.rfind(b"PK\x05\x06")
    entries, _, directory = struct.unpack_from("<HII", data, end + 10)
    position = directory
    for _ in range(entries):
        name_length, extra_length, comment_length = struct.unpack_from("<HHH", data, position + 28)
        if data[position + 46:position + 46 + name_length] == name.encode():
            struct.pack_into("<I", data, position + 24, size)
            local = struct.unpack_from("<I", data, position + 42)[0]
            struct.pack_into("<I", data, local + 22, size)
            return bytes(data)
        position += 46 + name_length + extra_length + comment_length
    raise KeyError(name)


def count_tokens(text: str) -> int:
    """A stand-in tokenizer: a token per word, per CJK character, per punctuation mark."""
    return len(re.findall(r"[\u4e00-\u9fff]|[^\W\u4e00-\u9fff]+|[^\w\s]", text))


# -- refusals are quick and harmless ------------------------------------------------------------------------------

def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def refused(source, filename: str, reason: str, limits: Limits = LIMITS, **extract_args) -> DocumentError:
    """extract() refuses with ``reason`` (``"time"`` when its worker was stopped at the time limit), and no worker
    is left running."""
    with pytest.raises(DocumentError) as caught:
        extract(source, filename, limits=limits, **extract_args)
    assert caught.value.reason == reason, str(caught.value)
    assert str(caught.value).startswith(filename.rsplit("/", 1)[-1])
    assert not [child for child in psutil.Process().children(recursive=True)
                if "chatglm_web.documents.worker" in " ".join(child.cmdline())]
    return caught.value


def assert_unharmed(peak_before: int, bomb_bytes: int) -> None:
    """This process's peak memory did not grow by anything like the bomb's size."""
    assert peak_rss() - peak_before < min(bomb_bytes // 4, 64 * MiB)


# -- extraction ---------------------------------------------------------------------------------------------------

CHINESE = "长江是中国最长的河流。\n\n它流经十一个省份，最后注入东海。"


def test_text_utf8_gb18030_and_markdown():
    document = extract(CHINESE.encode("utf-8"), "river.txt")
    assert (document.name, document.kind, document.pages, document.text) == ("river.txt", "text", None, CHINESE)
    assert document.chars == len(CHINESE)
    assert extract(CHINESE.encode("gb18030"), "river.txt").text == CHINESE
    assert extract(b"\xef\xbb\xbf" + CHINESE.encode("utf-8"), "river.txt").text == CHINESE   # BOM dropped
    assert extract(CHINESE.encode("utf-16"), "river.txt").text == CHINESE
    markdown = "# Title\r\n\r\n* one\r\n* two **bold**\r\n"
    document = extract(markdown.encode(), "notes.md")
    assert (document.kind, document.text) == ("markdown", "# Title\n\n* one\n* two **bold**")


def test_html_keeps_text_drops_script_and_style():
    page = b"""<!doctype html><html><head><meta charset="utf-8"><title>Bridge facts</title>
        <style>.secret { content: "STYLE_SECRET" }</style>
        <script>var token = "SCRIPT_SECRET"; if (a < b && c > d) {}</script></head>
        <body><h1>The   Zorvath
        bridge</h1><p>It opened in <b>1937</b> &amp; is red.</p><noscript>NOSCRIPT_SECRET</noscript>
        <table><tr><th>Length</th><td>2.7 km</td></tr></table><p>\xe5\xa4\xa7\xe6\xa1\xa5</p>
        <script type="module">SCRIPT_SECRET_2</script><template>TEMPLATE_SECRET</template></body></html>"""
    document = extract(page, "bridge.html")
    assert document.kind == "html"
    assert document.text == ("Bridge facts\n\nThe Zorvath bridge\n\nIt opened in 1937 & is red.\n\n"
                             "Length | 2.7 km\n\n大桥")
    assert "SECRET" not in document.text
    assert extract(page.replace(b'<meta charset="utf-8">', b""), "bridge.htm").text == document.text


def test_pdf_text_pages_and_page_positions():
    pages = ["Annual report (2023)\nRevenue grew strongly.", "The Zorvath bridge opened in 1937.", "Appendix"]
    document = extract(text_pdf(pages), "report.pdf")
    assert (document.kind, document.pages, len(document.page_starts)) == ("pdf", 3, 3)
    assert document.text == "Annual report (2023)\nRevenue grew strongly.\n\nThe Zorvath bridge opened in 1937." \
                            "\n\nAppendix"
    assert document.page_at(document.text.index("Zorvath")) == 2
    assert document.page_at(document.text.index("Appendix")) == 3
    assert document.describe() == "PDF, 3 pages"


def test_docx_paragraphs_and_tables_in_order(tmp_path):
    data = docx_bytes(["First paragraph.", "第二段：青龙大桥。"], [["Name", "Year"], ["Zorvath", "1937"]],
                      ["Last one."])
    path = tmp_path / "upload-1234"
    path.write_bytes(data)
    document = extract(path, "facts.docx")       # a path, named by the user
    assert (document.name, document.kind, document.pages) == ("facts.docx", "docx", None)
    assert document.text == "First paragraph.\n第二段：青龙大桥。\nName | Year\nZorvath | 1937\nLast one."
    named = tmp_path / "same.docx"
    named.write_bytes(data)
    assert extract(named).name == "same.docx"    # by default, the path's own name


def test_encrypted_pdf_refused_unless_it_opens_without_a_password():
    from pypdf import PdfReader, PdfWriter

    def encrypted(user_password: str) -> bytes:
        writer = PdfWriter(clone_from=PdfReader(io.BytesIO(text_pdf(["Secret plans"]))))
        writer.encrypt(user_password, "owner password")
        out = io.BytesIO()
        writer.write(out)
        return out.getvalue()

    error = refused(encrypted("secret"), "locked.pdf", "encrypted")
    assert "password" in str(error)
    assert extract(encrypted(""), "permissions-only.pdf").text == "Secret plans"


# -- refusals by name and content ---------------------------------------------------------------------------------

@pytest.mark.parametrize("filename", ["sheet.xlsx", "tool.exe", "README", "archive.zip", "old.doc"])
def test_unsupported_types_are_named(filename):
    error = refused(b"anything", filename, "unsupported")
    assert ".txt, .md, .pdf, .docx or .html" in str(error)


@pytest.mark.parametrize("data, filename, looks_like", [
    (b"MZ\x90\x00\x03\x00\x00\x00\x04\x00\x00\x00\xff\xff" + bytes(range(256)) * 8, "invoice.pdf", "a Windows program"),
    (random.Random(1).randbytes(4096), "random.pdf", "not in the PDF format"),
    (b"\x7fELF\x02\x01\x01" + bytes(500), "notes.txt", "a Linux program"),
    (b"\x89PNG\r\n\x1a\n" + bytes(100), "page.html", "a PNG image"),
    (b"%PDF-1.7\n" + bytes(100), "letter.docx", "a PDF"),
    (b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(600), "letter.docx", "old Office document"),
])
def test_content_that_does_not_match_the_extension(data, filename, looks_like):
    error = refused(data, filename, "wrong_type")
    assert looks_like in str(error)


def test_a_zip_that_is_not_a_word_document():
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("photo.jpg", b"\xff\xd8\xff" + bytes(100))
    assert "not a Word document" in str(refused(out.getvalue(), "photos.docx", "wrong_type"))


def test_empty_damaged_and_textless_files():
    refused(b"", "empty.txt", "empty")
    pdf = text_pdf(["Hello world"])
    error = refused(pdf[:200] + random.Random(2).randbytes(300), "broken.pdf", "damaged")
    assert "damaged" in str(error)
    refused(docx_bytes(["Hello"])[:3000], "cut.docx", "damaged")
    error = refused(one_page_pdf(pdf_stream(b"0 0 m 100 100 l S")), "drawing.pdf", "no_text")
    assert "scanned" in str(error)
    refused(b"\n \n\t\n", "blank.md", "no_text")
    refused("caf\xe9 cr\xe8me \x80\x81\x82".encode("latin-1") * 3 + b"\x81\xff", "latin.txt", "not_text")


def test_file_over_the_size_limit_is_refused_before_reading(tmp_path):
    assert "20 MB" in str(refused(b"a" * (LIMITS.file_bytes + 1), "big.txt", "too_large"))
    huge = tmp_path / "huge.pdf"
    with open(huge, "wb") as file:                 # 4 GB, sparse: only reading it would cost anything
        file.truncate(4_000_000_000)
    before = peak_rss()
    error = refused(huge, "huge.pdf", "too_large")
    assert "4,000.0 MB" in str(error) and "limited to 20 MB" in str(error)
    assert_unharmed(before, 4_000_000_000)


def test_too_many_pages():
    error = refused(text_pdf(["p"] * (LIMITS.pages + 1)), "long.pdf", "pages")
    assert "more than 500 pages" in str(error) and "limited to 500 pages" in str(error)
    assert extract(text_pdf(["p"] * 3), "short.pdf", limits=Limits(pages=3)).pages == 3


def test_too_much_text():
    text = ("word " * 420_000).encode()                               # 2,100,000 characters
    assert "2,000,000 characters" in str(refused(text, "long.txt", "chars"))
    small = Limits(chars=1000)
    refused(b"x" * 1001, "a.txt", "chars", small)
    refused(text_pdf(["y" * 400] * 3), "a.pdf", "chars", small)
    refused(docx_bytes(["z" * 600, "z" * 600]), "a.docx", "chars", small)
    refused(b"<p>" + b"w" * 1200 + b"</p>", "a.html", "chars", small)
    assert extract(b"x" * 1000, "a.txt", limits=small).chars == 1000


# -- bombs ----------------------------------------------------------------------------------------------------------

GB = 1 << 30


def test_zip_bomb_docx_is_refused_before_unpacking():
    before = peak_rss()
    bomb = with_member(docx_bytes(["Hello"]), "word/media/zeros.bin", (bytes(MiB) for _ in range(256)))
    assert len(bomb) < 2 * MiB
    error = refused(bomb, "bomb.docx", "bomb")
    unpacked = re.search(r"would unpack to ([\d,]+) MiB, over the limit of 100 MiB", str(error))
    assert unpacked and int(unpacked.group(1)) >= 256
    # a member that declares gigabytes
    liar = declare_size(docx_bytes(["Hello"]), "word/document.xml", 0xF000_0000)
    assert re.search(r"would unpack to 3,8\d\d MiB", str(refused(liar, "declares.docx", "bomb")))
    # packed 1000:1 under the total cap
    dense = with_member(docx_bytes(["Hello"]), "word/media/dense.bin", (bytes(MiB) for _ in range(50)))
    assert "over the limit of 100:1" in str(refused(dense, "dense.docx", "bomb"))
    assert_unharmed(before, 256 * MiB)


def test_zip_member_that_unpacks_to_more_than_it_declares_is_damaged():
    """zipfile stops at the declared size and fails the CRC: a lie about the size unpacks nothing more."""
    before = peak_rss()
    real = docx_bytes(["Hello"])
    with zipfile.ZipFile(io.BytesIO(real)) as archive:
        styles = archive.read("word/styles.xml")
    spaces = itertools.chain([styles], (b" " * MiB for _ in range(256)))       # 256 MiB more than declared
    liar = declare_size(with_member(real, "word/styles.xml", spaces, replace=True), "word/styles.xml", len(styles))
    error = refused(liar, "liar.docx", "damaged")
    assert "word/styles.xml is damaged or unpacks to more than it declares" in str(error)
    assert_unharmed(before, 264 * MiB)


def test_pdf_bombs():
    before = peak_rss()
    # a page tree whose nodes are shared: nine levels of ten kids each claim a billion pages
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>"]
    for level in range(9):
        objects.append(b"<< /Type /Pages /Kids [%s] /Count %d >>" % (b" ".join([b"%d 0 R" % (level + 3)] * 10),
                                                                    10 ** (9 - level)))
    objects.append(b"<< /Type /Page /MediaBox [0 0 612 792] >>")
    assert "more than 500 pages" in str(refused(raw_pdf(objects), "laughs.pdf", "pages"))
    # a page tree that loops
    looped = raw_pdf([b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
                      b"<< /Type /Pages /Kids [2 0 R] /Count 1 >>"])
    refused(looped, "loop.pdf", "damaged")
    # a content stream that inflates to 1 GiB
    flate = one_page_pdf(pdf_stream(zeros_deflated(GB, 15), b"/Filter /FlateDecode"))
    assert len(flate) < LIMITS.file_bytes
    error = refused(flate, "flate.pdf", "bomb")
    assert "safety limits" in str(error)
    assert_unharmed(before, GB)


def test_memory_limit():
    """A stream that inflates to 70 MB (under pypdf's own 75 MB cap) in a worker limited to 128 MiB."""
    before = peak_rss()
    flate = one_page_pdf(pdf_stream(zeros_deflated(70 * MiB, 15), b"/Filter /FlateDecode"))
    error = refused(flate, "heavy.pdf", "memory", Limits(memory_bytes=128 * MiB))
    assert "128 MiB memory limit" in str(error)
    assert_unharmed(before, 70 * MiB)


def test_time_limit_kills_the_worker():
    """html.parser takes seconds over megabytes of tags: the 2 s limit kills the worker (refused() checks that
    none is left)."""
    slow = b"<html><body>" + b"<b>x</b>" * 1_500_000 + b"</body></html>"
    error = refused(slow, "slow.html", "time", Limits(seconds=2))
    # the wall-clock limit or the CPU limit (the same 2 s), whichever the worker meets first on this machine
    assert re.search(r"the 2 s (CPU )?limit", str(error)), error


def test_a_busy_machine_still_gets_an_answer_for_each_document():
    """Several documents at once: at most MAX_WORKERS workers run, the others wait for a slot."""
    from concurrent.futures import ThreadPoolExecutor

    data = [f"Document number {i}.".encode() for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda d: extract(d, "n.txt").text, data))
    assert texts == [d.decode() for d in data]


# -- passages and retrieval ---------------------------------------------------------------------------------------

def english_document(fact: str, paragraphs: int = 300, seed: int = 3) -> Document:
    """Filler paragraphs about bridges, rivers and towns, ``fact`` in the middle of them."""
    rng = random.Random(seed)
    words = ["bridge", "river", "town", "council", "built", "opened", "road", "traffic", "stone", "steel",
             "engineer", "year", "mayor", "harbour", "market", "railway", "station", "museum", "people", "winter",
             "summer", "trade", "water", "city", "north", "south"]
    filler = [" ".join(rng.choice(words) for _ in range(rng.randint(40, 90))).capitalize() + "."
              for _ in range(paragraphs)]
    filler.insert(paragraphs // 2, fact)
    text = "\n\n".join(filler)
    return Document("town.txt", "text", None, text, len(text))


def chinese_document(fact: str, paragraphs: int = 300, seed: int = 4) -> Document:
    """Filler sentences about a city, its river and bridges, ``fact`` a third of the way in."""
    rng = random.Random(seed)
    phrases = ["这座城市", "河流", "建成", "大桥", "铁路", "市场", "冬天", "夏天", "人们", "工程师",
               "港口", "博物馆", "北方", "南方", "贸易", "车站", "年份", "石头", "钢铁", "交通"]
    filler = ["，".join(rng.choice(phrases) for _ in range(rng.randint(20, 40))) + "。" for _ in range(paragraphs)]
    filler.insert(paragraphs // 3, fact)
    text = "\n\n".join(filler)
    return Document("城市.txt", "text", None, text, len(text))


FACTS = [
    (english_document, "The Zorvath bridge was opened in 1937 by mayor Ellison.",
     "When was the Zorvath bridge opened?"),
    (chinese_document, "青龙大桥于一九三七年建成通车，由市长艾利森剪彩。", "青龙大桥是哪一年建成的？"),
]


def test_terms_words_and_cjk_characters_with_pairs():
    assert terms("The Bridges of 1937, ＡＢＣ!") == ["the", "bridge", "of", "1937", "abc"]
    assert terms("长江大桥") == ["长", "江", "大", "桥", "长江", "江大", "大桥"]
    assert terms("ChatGLM3模型") == ["chatglm3", "模", "型", "模型"]


def test_passages_keep_positions_and_sizes():
    document = english_document("The Zorvath bridge opened in 1937.")
    passages = split_passages(document)
    assert len(passages) > 20
    for i, passage in enumerate(passages):
        assert passage.index == i
        assert document.text[passage.start:passage.end] == passage.text
        assert estimate_tokens(passage.text) <= MAX_TOKENS
        assert passage.first_page is None
    assert all(a.end <= b.start for a, b in itertools.pairwise(passages))
    covered = "".join(p.text for p in passages)
    assert re.sub(r"\s", "", covered) == re.sub(r"\s", "", document.text)       # nothing left out


def test_long_lines_without_breaks_are_cut():
    text = "没有标点的很长一段中文" * 500 + " " + "word " * 3000
    document = Document("one-line.txt", "text", None, text, len(text))
    passages = split_passages(document)
    assert all(estimate_tokens(p.text) <= MAX_TOKENS for p in passages)
    assert re.sub(r"\s", "", "".join(p.text for p in passages)) == re.sub(r"\s", "", text)


def test_pdf_passages_know_their_pages():
    pages = [f"Page {n} talks about topic {n}.\n" + "filler text here " * 30 for n in range(1, 6)]
    document = extract(text_pdf(pages), "topics.pdf")
    passages = split_passages(document, target=50, most=120)
    assert passages[0].first_page == 1 and passages[-1].last_page == 5
    hit = PassageIndex(passages).top_passages("topic 4", k=1)[0]
    assert "topic 4" in hit.passage.text and hit.passage.first_page == 4


@pytest.mark.parametrize("make, fact, question", FACTS)
def test_retrieval_finds_the_passage_with_the_fact(make, fact, question):
    document = make(fact)
    index = PassageIndex.of(document)
    best = index.top_passages(question, k=3)
    assert fact in best[0].passage.text
    assert best[0].score > best[1].score
    within = index.top_passages(question, token_budget=600, count_tokens=count_tokens)
    assert fact in within[0].passage.text
    assert sum(count_tokens(hit.passage.text) for hit in within) <= 600


def test_question_without_known_terms_ranks_in_document_order():
    index = PassageIndex.of(english_document("A fact."))
    hits = index.top_passages("Summarise, please", k=3)
    assert [hit.passage.index for hit in hits] == [0, 1, 2] and {hit.score for hit in hits} == {0.0}
    with pytest.raises(ValueError):
        index.top_passages("question")


# -- what goes into the prompt ------------------------------------------------------------------------------------

def test_whole_document_when_it_fits():
    document = extract(text_pdf(["Revenue grew.", "The bridge opened in 1937."]), "report.pdf")
    fitted = fit_document(document, "When did the bridge open?", 1000, count_tokens)
    assert fitted.mode == WHOLE and fitted.whole
    assert fitted.block == "Document: report.pdf (PDF, 2 pages)\n\n[Page 1]\nRevenue grew.\n\n[Page 2]\n" \
                           "The bridge opened in 1937."
    assert fitted.block_tokens == count_tokens(fitted.block) <= 1000
    assert (fitted.included_chars, fitted.total_chars, fitted.share) == (document.chars, document.chars, 1.0)
    assert fitted.included_tokens == fitted.total_tokens == count_tokens(document.text)
    assert fitted.passages == () and fitted.suggested_model is None


@pytest.mark.parametrize("make, fact, question", FACTS)
def test_passages_when_it_does_not_fit(make, fact, question):
    document = make(fact)
    fitted = fit_document(document, question, 1500, count_tokens)
    assert fitted.mode == PASSAGES and not fitted.whole
    assert fact in fitted.block
    assert fitted.block.startswith(f"Document: {document.name} (text file). It is too long to show whole")
    assert count_tokens(fitted.block) == fitted.block_tokens <= 1500
    assert [p.index for p in fitted.passages] == sorted(p.index for p in fitted.passages)
    assert fitted.block.index(fitted.passages[0].text) < fitted.block.index(fitted.passages[-1].text)
    assert fitted.included_chars == sum(len(p.text) for p in fitted.passages) < fitted.total_chars
    assert 0 < fitted.share < 0.5 and f"{fitted.share:.0%} of its text" in fitted.block
    assert fitted.included_tokens < fitted.total_tokens == count_tokens(document.text)
    assert "[…]" in fitted.block


def test_passage_blocks_name_their_pages():
    pages = [f"Page {n} is about topic {n}.\n" + "filler text here " * 40 for n in range(1, 30)]
    document = extract(text_pdf(pages), "topics.pdf")
    fitted = fit_document(document, "What is topic 17 about?", 300, count_tokens)
    assert fitted.mode == PASSAGES
    assert "[Page 17]\nPage 17 is about topic 17." in fitted.block


def test_attached_document_counts_and_indexes_once():
    calls = []

    def counting(text):
        calls.append(len(text))
        return count_tokens(text)

    document = english_document("The Zorvath bridge was opened in 1937.")
    attached = AttachedDocument(document, counting)
    first = attached.fit("When was the Zorvath bridge opened?", 2000)
    whole_counts = calls.count(len(document.text))
    index = attached.index
    calls.clear()
    second = attached.fit("Who opened the Zorvath bridge?", 2000)
    assert whole_counts == 1 and len(document.text) not in calls and attached.index is index
    assert first.mode == second.mode == PASSAGES
    assert len(calls) < 10            # a header, the block: the passages were counted the first time


def test_budgets_too_small_for_any_passage():
    document = english_document("A fact.")
    fitted = fit_document(document, "fact", 30, count_tokens)
    assert (fitted.mode, fitted.block, fitted.passages, fitted.included_chars) == (PASSAGES, "", (), 0)
    with pytest.raises(ValueError):
        fit_document(document, "fact", 0, count_tokens)


def test_longer_context_model_suggested_far_over_the_budget():
    assert suggest_model(20_000, 6_000) is None                              # 3.3x: passages will do
    assert suggest_model(25_000, 6_000) == "THUDM/chatglm3-6b-32k"
    assert suggest_model(200_000, 6_000) == "THUDM/chatglm3-6b-128k"
    assert suggest_model(200_000, 30_000) == "THUDM/chatglm3-6b-128k"        # on the 32k model already
    assert suggest_model(2_000_000, 120_000) is None                         # on the 128k model already
    document = english_document("A fact.", paragraphs=300)
    fitted = fit_document(document, "fact", 1000, count_tokens)
    assert fitted.total_tokens > 4 * 1000 and fitted.suggested_model == "THUDM/chatglm3-6b-32k"
