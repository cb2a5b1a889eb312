"""Conversation downloads keep exactly the typed and generated text; Gradio 6 content blocks are flattened."""

import json

from chatglm_web.chat_format import normalize_messages
from chatglm_web.transcript import to_json, to_markdown, write_download

HISTORY = [
    {"role": "user", "content": [{"type": "text", "text": "<b>hi</b> $x^2$"}], "metadata": {"title": None}},
    {"role": "assistant", "content": "```python\nprint('你好')\n```", "options": []},
]


def test_content_blocks_are_flattened_and_gradio_metadata_dropped():
    assert normalize_messages(HISTORY) == [
        {"role": "user", "content": "<b>hi</b> $x^2$"},
        {"role": "assistant", "content": "```python\nprint('你好')\n```"},
    ]


def test_markdown_and_json_exports(tmp_path):
    md = to_markdown(HISTORY)
    assert "## User\n\n<b>hi</b> $x^2$" in md and "print('你好')" in md
    data = json.loads(to_json(HISTORY))
    assert data["messages"][1]["content"] == "```python\nprint('你好')\n```"
    path = write_download(md, "md")
    assert path.endswith(".md") and open(path, encoding="utf-8").read() == md
    assert write_download(md, "md") == path  # same conversation, same file
