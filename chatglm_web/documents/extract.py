"""``extract(path_or_bytes, filename) -> Document``: a document's text, read in a worker process with limits.

    document = extract("/tmp/upload/abc", "report.pdf")     # or extract(data, "report.pdf")
    document.name, document.kind, document.pages, document.text, document.chars, document.page_at(offset)

Steps, each refusing with ``DocumentError`` (``.reason``, and a message naming the file and any cap):

1. the extension must be .txt / .md / .pdf / .docx / .html (sniff.py)             "unsupported"
2. the file must be at most LIMITS.file_bytes (20 MB), checked before reading it    "too_large", "unreadable"
3. its first bytes must match the extension (a PDF starts %PDF-, a .docx is a zip)  "wrong_type", "empty"
4. a worker process parses it (worker.py) under these caps of limits.py:
       30 s wall clock (then its process group is killed), 30 s CPU                 "time"
       512 MiB address space                                                        "memory"
       500 pages, 2,000,000 characters                                              "pages", "chars"
       a .docx unpacking to over 100 MiB, or packed over 100:1; a PDF stream over
       pypdf's own caps                                                             "bomb"
   and refuses encrypted PDFs ("encrypted"), damaged files ("damaged"), files that are not text after all
   ("not_text"), documents without any text ("no_text"); a worker that dies otherwise gives "crashed".
5. at most MAX_WORKERS documents are read at once; another waits up to limits.seconds, then "busy".

The worker is a fresh interpreter (``python -m chatglm_web.documents.worker``), not a fork of the threaded
server; it gets the document's bytes in a temporary file and writes its answer to another, so a hostile
document can neither fill the server's memory nor block it on a pipe. What comes back is read up to the
character cap only.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from chatglm_web.documents.document import Document, DocumentError
from chatglm_web.documents.limits import LIMITS, Limits, mebibytes, megabytes
from chatglm_web.documents.sniff import HEAD_BYTES, check_content, display_name, kind_of

log = logging.getLogger(__name__)

MAX_WORKERS = 2                 # documents read at once (each worker may use limits.memory_bytes)
HEADER_BYTES = 1 << 20          # the worker's JSON line is shorter than this
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]   # the folder holding chatglm_web/
_slots = threading.BoundedSemaphore(MAX_WORKERS)

__all__ = ["Document", "DocumentError", "extract"]


def extract(source: str | os.PathLike | bytes, filename: str | None = None, *, limits: Limits = LIMITS) -> Document:
    """The text of the document at path ``source`` (or in the bytes ``source``), named ``filename`` (the name
    the user gave it; by default the path's own name). DocumentError, with a message for the user, when it
    cannot or may not be read (see the module docstring)."""
    if filename is None:
        if isinstance(source, (bytes, bytearray, memoryview)):
            raise TypeError("extract(data, filename): bytes need a filename")
        filename = os.fspath(source)
    name = display_name(filename)
    kind = kind_of(name)
    data = _read(source, name, limits)
    check_content(name, kind, data[:HEAD_BYTES])
    if not _slots.acquire(timeout=limits.seconds):
        raise DocumentError("busy", f"{name}: other documents are being read right now; try again in a moment.")
    try:
        header, body = _run_worker(name, kind, data, limits)
    except OSError as error:          # the temporary files: a full disk, say
        raise DocumentError("crashed", f"{name} could not be read: the document reader failed to start "
                                       f"({error.strerror or error}).") from None
    finally:
        _slots.release()
    return _document(name, kind, header, body, limits)


def _read(source, name: str, limits: Limits) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        _check_size(name, len(data), limits)
        return data
    try:
        with open(source, "rb") as file:
            info = os.fstat(file.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise DocumentError("unreadable", f"{name} is not a regular file.")
            _check_size(name, info.st_size, limits)
            data = file.read(limits.file_bytes + 1)
    except OSError as error:
        raise DocumentError("unreadable", f"{name} could not be read ({error.strerror or error}).") from None
    _check_size(name, len(data), limits)
    return data


def _check_size(name: str, size: int, limits: Limits) -> None:
    if size > limits.file_bytes:
        raise DocumentError("too_large", f"{name} is {size / 1e6:,.1f} MB; documents are limited to "
                                         f"{megabytes(limits.file_bytes)}.")


def _run_worker(name: str, kind: str, data: bytes, limits: Limits) -> tuple[dict, bytes]:
    """The worker's JSON line and the bytes after it; DocumentError when it timed out or died."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGE_ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "chatglm_web.documents.worker", kind, json.dumps(limits.to_dict())]
    with tempfile.TemporaryFile() as given, tempfile.TemporaryFile() as answer, \
            tempfile.TemporaryFile() as errors:
        given.write(data)
        given.seek(0)
        try:
            process = subprocess.Popen(command, stdin=given, stdout=answer, stderr=errors, env=env,
                                       close_fds=True, start_new_session=True)
        except OSError as error:
            raise DocumentError("crashed", f"{name}: the document reader could not start ({error}).") from None
        try:
            status = process.wait(timeout=limits.seconds)
        except subprocess.TimeoutExpired:
            status = None
        finally:
            if process.poll() is None:
                _kill(process)
        if status is None:
            raise DocumentError("time", f"{name}: reading it took longer than the {limits.seconds:g} s limit; "
                                        "it was stopped.")
        answer.seek(0)
        output = answer.read(HEADER_BYTES + 4 * limits.chars + 1)
        line, newline, body = output.partition(b"\n")
        header = _header(line) if newline else None
        if status != 0 or header is None:
            errors.seek(0, os.SEEK_END)
            errors.seek(max(0, errors.tell() - 2000))
            raise _died(name, status, errors.read().decode("utf-8", "replace"), limits)
        return header, body


def _kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        process.kill()
    process.wait()


def _header(line: bytes) -> dict | None:
    try:
        header = json.loads(line)
    except ValueError:
        return None
    return header if isinstance(header, dict) and isinstance(header.get("ok"), bool) else None


def _died(name: str, status: int, stderr_tail: str, limits: Limits) -> DocumentError:
    """The error for a worker that ended without an answer."""
    log.warning("document worker for %r ended with status %s: %s", name, status, stderr_tail[-500:])
    if status in (-signal.SIGXCPU, -signal.SIGKILL):
        return DocumentError("time", f"{name}: reading it used more than the {limits.seconds:g} s CPU limit; "
                                     "it was stopped.")
    if status == -signal.SIGXFSZ:
        return _too_much_text(name, limits)
    if "MemoryError" in stderr_tail or status in (-signal.SIGSEGV, -signal.SIGABRT, -signal.SIGBUS):
        return _out_of_memory(name, limits)
    how = f"signal {signal.Signals(-status).name}" if status < 0 else f"exit status {status}"
    return DocumentError("crashed", f"{name}: the document reader stopped unexpectedly ({how}); the file may be "
                                    "damaged.")


def _document(name: str, kind: str, header: dict, body: bytes, limits: Limits) -> Document:
    if not header["ok"]:
        raise _refused(name, kind, str(header.get("reason", "")), str(header.get("detail", "")), limits)
    text = body.decode("utf-8", "replace")
    if len(text) > limits.chars:
        raise _too_much_text(name, limits)
    if not text.strip():
        hint = (": a scanned PDF holds pictures of its pages, and text recognition (OCR) is not supported"
                if kind == "pdf" else "")
        raise DocumentError("no_text", f"{name} has no text to read{hint}.")
    pages = header.get("pages")
    starts = header.get("page_starts") or []
    if not (pages is None or isinstance(pages, int)) or not all(isinstance(s, int) for s in starts):
        raise DocumentError("crashed", f"{name}: the document reader gave a malformed answer.")
    return Document(name=name, kind=kind, pages=pages, text=text, chars=len(text), page_starts=tuple(starts))


def _refused(name: str, kind: str, reason: str, detail: str, limits: Limits) -> DocumentError:
    """The message for a worker's refusal (reasons: parsers.py, worker.py)."""
    if reason == "pages":
        return DocumentError(reason, f"{name} has {detail or 'too many'} pages; documents are limited to "
                                     f"{limits.pages:,} pages.")
    if reason == "chars":
        return _too_much_text(name, limits)
    if reason == "memory":
        return _out_of_memory(name, limits)
    if reason == "encrypted":
        return DocumentError(reason, f"{name} is encrypted (protected by a password); attach a copy saved "
                                     "without the password.")
    if reason == "bomb":
        return DocumentError(reason, f"{name} was not read: {detail}. That limit guards against zip and PDF "
                                     "bombs.")
    if reason == "not_text":
        return DocumentError(reason, f"{name} could not be read as text: {detail}.")
    if reason == "wrong_type":
        return DocumentError(reason, f"{name} is not a Word document ({detail}).")
    what = {"pdf": "PDF", "docx": "Word document", "html": "HTML page"}.get(kind, "file")
    return DocumentError("damaged", f"{name} could not be read: the {what} is damaged"
                                    + (f" ({detail})." if detail else "."))


def _too_much_text(name: str, limits: Limits) -> DocumentError:
    return DocumentError("chars", f"{name} has more than {limits.chars:,} characters of text; documents are "
                                  f"limited to {limits.chars:,} characters.")


def _out_of_memory(name: str, limits: Limits) -> DocumentError:
    return DocumentError("memory", f"{name}: reading it needed more than the {mebibytes(limits.memory_bytes)} "
                                   "memory limit; it was stopped.")
