"""A conversation as a downloadable Markdown or JSON file (exactly the text that was typed and generated)."""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path

from .chat_format import normalize_messages

_DOWNLOADS = Path(tempfile.gettempdir()) / "chatglm-web-downloads"


def to_markdown(history: list[dict]) -> str:
    titles = {"system": "System", "user": "User", "assistant": "Assistant", "observation": "Observation"}
    parts = ["# Conversation\n"]
    for message in normalize_messages(history or []):
        parts.append(f"## {titles.get(message['role'], message['role'])}\n\n{message['content']}\n")
    return "\n".join(parts)


def to_json(history: list[dict]) -> str:
    return json.dumps({"messages": normalize_messages(history or [])}, ensure_ascii=False, indent=2)


def write_download(text: str, extension: str) -> str:
    """Write ``text`` to a file named by its content hash (identical conversations share one file)."""
    _DOWNLOADS.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    path = _DOWNLOADS / f"conversation-{digest}.{extension}"
    if not path.exists():
        path.write_text(text, encoding="utf-8")
    return str(path)
