"""The process that parses one document: ``python -m chatglm_web.documents.worker KIND LIMITS_JSON``.

It limits itself before it reads a byte of the document, with ``Limits`` from its command line:

    RLIMIT_AS     limits.memory_bytes           a bomb gets MemoryError (or dies), the machine keeps its memory
    RLIMIT_CPU    limits.seconds (hard: +1 s)   SIGXCPU, then SIGKILL: it ends even if its parent is gone
    RLIMIT_FSIZE  what the answer can need      its stdout is a file: an answer past the character cap dies
    RLIMIT_CORE   0                             no core dumps

(extract.py adds the wall clock: it kills the worker's process group ``limits.seconds`` after starting it.)

Protocol: stdin is the document's bytes (a file), stdout gets one JSON line and then, on success, the text as
UTF-8. The JSON line is ``{"ok": true, "pages": 12 | null, "page_starts": [...], "chars": N}`` or
``{"ok": false, "reason": "encrypted", "detail": "..."}`` (reasons as DocumentError's). A parser's
Refusal gives its reason; MemoryError gives "memory"; any other exception "damaged", with its type and
message as the detail. Exit status 0 whenever a JSON line was written.
"""

from __future__ import annotations

import json
import logging
import re
import resource
import sys
import warnings

from chatglm_web.documents.limits import Limits
from chatglm_web.documents.parsers import Refusal, parse, short

_SURROGATES = re.compile("[\ud800-\udfff]")
_HEADER_SLACK = 1 << 20          # the JSON line: page starts of at most limits.pages pages, a message


def set_limits(limits: Limits) -> None:
    """The worker's own resource limits (never above a hard limit already in force)."""
    _set(resource.RLIMIT_AS, limits.memory_bytes)
    seconds = max(1, int(limits.seconds + 0.999))
    _set(resource.RLIMIT_CPU, seconds, extra=1)
    _set(resource.RLIMIT_FSIZE, 4 * limits.chars + _HEADER_SLACK)
    _set(resource.RLIMIT_CORE, 0)


def _set(limit: int, soft: int, extra: int = 0) -> None:
    cap = resource.getrlimit(limit)[1]
    hard = soft + extra if cap == resource.RLIM_INFINITY else min(soft + extra, cap)
    resource.setrlimit(limit, (min(soft, hard), hard))


def answer(kind: str, data: bytes, limits: Limits) -> bytes:
    """The bytes the worker writes for ``data``: the JSON line, and the text after it on success."""
    try:
        parsed = parse(kind, data, limits)
        text = _SURROGATES.sub("\ufffd", parsed.text)
        header = {"ok": True, "pages": parsed.pages, "page_starts": list(parsed.page_starts), "chars": len(text)}
        return json.dumps(header).encode("ascii") + b"\n" + text.encode("utf-8")
    except Refusal as refusal:
        return _refusal(refusal.reason, refusal.detail)
    except RecursionError as error:
        return _refusal("damaged", f"it is nested too deeply ({short(error)})")
    except MemoryError:
        raise
    except Exception as error:  # noqa: BLE001 - pypdf, python-docx and lxml raise many kinds for a broken file
        return _refusal("damaged", f"{type(error).__name__}: {short(error)}")


def _refusal(reason: str, detail: str = "") -> bytes:
    return json.dumps({"ok": False, "reason": reason, "detail": detail}).encode("ascii") + b"\n"


def main(argv: list[str]) -> int:
    kind, limits_json = argv
    limits = Limits.from_dict(json.loads(limits_json))
    logging.disable(logging.WARNING)         # pypdf logs a line per oddity: stderr (a file) stays small
    warnings.simplefilter("ignore")
    out_of_memory = _refusal("memory")       # made before the limit, so that writing it needs no memory
    out = sys.stdout.buffer
    set_limits(limits)
    try:
        reply = answer(kind, sys.stdin.buffer.read(), limits)
    except MemoryError:
        reply = out_of_memory
    out.write(reply)
    out.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
