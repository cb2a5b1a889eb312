"""Conversation downloads keep exactly the typed and generated text; Gradio 6 content blocks are flattened."""

import json

from chatglm_web.messages import normalize_messages
from chatglm_web.conversations.transcript import remove_legacy_downloads, to_json, to_markdown

HISTORY = [
    {"role": "user", "content": [{"type": "text", "text": "<b>hi</b> $x^2$"}], "metadata": {"title": None}},
    {"role": "assistant", "content": "```python\nprint('你好')\n```", "options": []},
]


def test_content_blocks_are_flattened_and_gradio_metadata_dropped():
    assert normalize_messages(HISTORY) == [
        {"role": "user", "content": "<b>hi</b> $x^2$"},
        {"role": "assistant", "content": "```python\nprint('你好')\n```"},
    ]


def test_markdown_and_json_exports():
    md = to_markdown(HISTORY)
    assert md == "# Conversation\n\n## User\n\n<b>hi</b> $x^2$\n\n## Assistant\n\n```python\nprint('你好')\n```\n"
    data = json.loads(to_json(HISTORY))
    assert data == {"messages": normalize_messages(HISTORY)}
    assert data["messages"][1]["content"] == "```python\nprint('你好')\n```"
    assert to_markdown([]) == "# Conversation\n" and json.loads(to_json(None)) == {"messages": []}


def test_files_left_by_earlier_versions_are_removed(tmp_path):
    legacy = tmp_path / "chatglm-web-downloads"
    legacy.mkdir()
    (legacy / "conversation-0123456789abcdef.md").write_text("# Conversation\n", encoding="utf-8")
    remove_legacy_downloads(legacy)
    assert not legacy.exists()
    remove_legacy_downloads(legacy)  # nothing there: no error
