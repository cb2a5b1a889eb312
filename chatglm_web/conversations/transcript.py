"""A conversation as downloadable Markdown or JSON text (exactly the text that was typed and generated).

The page builds this text only when a download button is clicked and hands it to the browser, which
saves it; nothing is written to the server's disk.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from chatglm_web.messages import normalize_messages

#: Where versions before 0.2 wrote a Markdown and a JSON file on every change of the chat, never deleted.
LEGACY_DOWNLOADS = Path(tempfile.gettempdir()) / "chatglm-web-downloads"


def to_markdown(history: list[dict]) -> str:
    titles = {"system": "System", "user": "User", "assistant": "Assistant", "observation": "Observation"}
    parts = ["# Conversation\n"]
    for message in normalize_messages(history or []):
        parts.append(f"## {titles.get(message['role'], message['role'])}\n\n{message['content']}\n")
    return "\n".join(parts)


def to_json(history: list[dict]) -> str:
    return json.dumps({"messages": normalize_messages(history or [])}, ensure_ascii=False, indent=2)


def remove_legacy_downloads(directory: Path = LEGACY_DOWNLOADS) -> None:
    """Delete the download files older versions left in the temporary directory."""
    shutil.rmtree(directory, ignore_errors=True)
