"""Chat messages as plain data, the vocabulary below every layer: content made plain text, messages reduced
to the keys a prompt uses. Imports nothing of the package.

    plain_text(content)          -> str: a string, or Gradio's content blocks' text (files and images left out)
    normalize_messages(messages) -> [{"role", "content": str, "metadata"?, "tools"?}]

A message's ``metadata`` (the line a family writes before an assistant message's text: a tool name,
"interpreter") and a system message's ``tools`` (the tools offered) are kept for the families that use them.
"""

from __future__ import annotations


def plain_text(content) -> str:
    """Message content as plain text: a string, or Gradio 6 content blocks ([{"type": "text", "text": ...}])."""
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        content = [content]
    if isinstance(content, (list, tuple)):
        parts = []
        for block in content:
            if isinstance(block, str):
                parts.append(block)
            elif isinstance(block, dict) and block.get("type", "text") == "text" and "text" in block:
                parts.append(str(block["text"]))
            # files/images are not understood by a text model: left out of the prompt
        return "\n".join(parts)
    if content is None:
        return ""
    return str(content)


def normalize_messages(messages: list[dict]) -> list[dict]:
    """Keep role/content (+ a message's metadata line and a system message's tools), flatten content to text."""
    out = []
    for message in messages:
        item = {"role": message.get("role"), "content": plain_text(message.get("content"))}
        for key in ("metadata", "tools"):
            if message.get(key) and isinstance(message.get(key), (str, list)):
                item[key] = message[key]
        out.append(item)
    return out
