"""Chat with a document: its text, read safely, and the part of it that goes into the prompt.

This package owns everything between an uploaded file and the text block the prompt gets:

    limits.py     the caps on what is read (file size, pages, characters, time, memory, zip sizes)
    sniff.py      which kind a file is, by its extension and its first bytes
    extract.py    ``extract(path_or_bytes, filename) -> Document``: runs the parsing in a worker process
    worker.py     that process (``python -m chatglm_web.documents.worker``): sets its own limits, then parses
    parsers.py    the parsers the worker runs: plain text / Markdown, HTML, PDF (pypdf), .docx (python-docx)
    retrieval.py  passages of a document and a BM25 index over them (Chinese and Latin text, no network)
    fitting.py    whole document or retrieved passages, as a prompt block that fits a token budget, and
                  how much of the document that block holds
    prompt.py     the room a conversation leaves for documents, shared among several, and the
                  ``<document>`` frame in a user message (the API's and the page's common part)

    document = extract(upload_path, "report.pdf")               # DocumentError with a message otherwise
    attached = AttachedDocument(document, lambda text: len(tokenizer.encode(text)))  # once per conversation
    fitted = attached.fit(question, token_budget=6000)          # each question
    fitted.block, fitted.mode, fitted.included_chars, fitted.total_chars, fitted.suggested_model

Imports: the standard library, ``generation`` and ``messages`` (``prompt.py``), and pypdf / python-docx in
the worker process only. Nothing from
``chatglm_web.page`` or the server: the page wires this package in, never the other way round.
"""

from chatglm_web.documents.extract import Document, DocumentError, extract
from chatglm_web.documents.fitting import AttachedDocument, FittedDocument, fit_document
from chatglm_web.documents.limits import LIMITS, Limits
from chatglm_web.documents.retrieval import Passage, PassageIndex, split_passages

__all__ = [
    "LIMITS", "AttachedDocument", "Document", "DocumentError", "FittedDocument", "Limits", "Passage",
    "PassageIndex", "extract", "fit_document", "split_passages",
]
