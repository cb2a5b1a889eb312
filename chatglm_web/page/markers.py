"""How a reply ended, as a message of its own after it: stopped, cut off, failed, or interrupted.

The marker is an assistant message whose whole content is ``_<symbol> <words>_`` (italic in the chat),
so it shows under the reply on the page, stays in the stored conversation and in the downloads, and
is recognised exactly (``is_marker``) wherever the conversation goes back to the model, which never
sees it. A reply that streamed to its natural end has none.

    mark(history, "stopped", lang)      -> history + [marker]   (a marker already there is replaced)
    unmarked(history)                   -> history without a trailing marker
    while_streaming(history, lang)      -> what is stored while a reply streams: marked "interrupted",
                                           so a reload mid-reply shows the partial reply for what it is
"""

from __future__ import annotations

import re

from chatglm_web.messages import plain_text
from chatglm_web.page.strings import text

SYMBOLS = {"stopped": "⏹", "length": "✂", "failed": "⚠", "interrupted": "⚠"}
_MARKER = re.compile(r"_[⏹✂⚠] [^\n]*_")


def marker(kind: str, lang: str, error: str = "") -> dict:
    words = text(f"end_{kind}", lang, **({"error": " ".join(error.split())} if kind == "failed" else {}))
    return {"role": "assistant", "content": f"_{words}_"}


def is_marker(content) -> bool:
    """``content``: a string or Gradio's content parts (what the browser sends back)."""
    return content is not None and _MARKER.fullmatch(plain_text(content).strip()) is not None


def _content(message) -> object:
    return message.get("content") if isinstance(message, dict) and message.get("role") == "assistant" else None


def unmarked(history: list) -> list:
    history = list(history or [])
    while history and _content(history[-1]) is not None and is_marker(_content(history[-1])):
        history.pop()
    return history


def mark(history: list, kind: str, lang: str, error: str = "") -> list:
    return unmarked(history) + [marker(kind, lang, error)]


def while_streaming(history: list, lang: str) -> list:
    return mark(history, "interrupted", lang) if history else history


def marker_kind(content) -> str | None:
    """Which end a marker message stands for ("stopped", "length", "failed", "interrupted"), or None."""
    if not is_marker(content):
        return None
    words = plain_text(content).strip()
    symbol = words[1]
    if symbol == "⚠":
        return "interrupted" if any(words == f"_{text('end_interrupted', lang)}_" for lang in ("en", "zh-CN")) \
            else "failed"
    return {"⏹": "stopped", "✂": "length"}[symbol]


def ending_of(content) -> tuple[str, str] | None:
    """(kind, error) of a marker message, for reading an old linear history back (``tree.from_history``)."""
    kind = marker_kind(content)
    return None if kind is None else (kind, failed_error(content) if kind == "failed" else "")


def failed_error(content) -> str:
    """The error a "failed" marker names (its words without the "⚠ Failed: " around it)."""
    words = plain_text(content).strip()[1:-1]
    for lang in ("en", "zh-CN"):
        prefix = text("end_failed", lang, error="")
        if words.startswith(prefix):
            return words[len(prefix):].strip()
    return words.strip()
