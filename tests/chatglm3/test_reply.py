"""ChatGLM3 reply parsing: metadata line, safe tool calls, streaming filter."""

import random

import pytest

from chatglm_web.families.chatglm3.reply import ParsedReply, ReplyTextFilter, ToolCall, ToolCallError, parse_reply


def test_plain_answer():
    assert parse_reply("\n 你好！我是 ChatGLM3。\n\n有什么可以帮你？ \n", tools_available=True) == ParsedReply(
        content="你好！我是 ChatGLM3。\n\n有什么可以帮你？", metadata="", tool_call=None)


def test_empty_and_newline_free_replies():
    assert parse_reply("", tools_available=False) == ParsedReply("", "", None)
    assert parse_reply("\n", tools_available=True) == ParsedReply("", "", None)
    assert parse_reply("  no newline at all  ", tools_available=True) == ParsedReply("no newline at all", "", None)


def test_metadata_without_tools_is_plain_content():
    reply = parse_reply("interpreter\n```python\nprint(1)\n\nprint(2)\n```\n", tools_available=False)
    assert reply == ParsedReply("```python\nprint(1)\n\nprint(2)\n```", "interpreter", None)


@pytest.mark.parametrize("code, arguments", [
    ("tool_call(city='北京')", {"city": "北京"}),
    ("tool_call(a=1, b=-2.5, c=True, d=None, e='x\\ny')", {"a": 1, "b": -2.5, "c": True, "d": None, "e": "x\ny"}),
    ("tool_call(items=[1, [2, 'three'], {'k': ('t', 4)}], opts={'nested': {'deep': [None]}})",
     {"items": [1, [2, "three"], {"k": ("t", 4)}], "opts": {"nested": {"deep": [None]}}}),
    ("tool_call()", {}),
    ("tool_call(**{'a b': 1}, c=2, **{'class': [3], '': None})", {"a b": 1, "c": 2, "class": [3], "": None}),
    ("tool_call(\n    query=\"天气 weather\",\n    limit=3,\n)", {"query": "天气 weather", "limit": 3}),
])
def test_tool_calls(code, arguments):
    text = f"get_weather \n```python\n{code}\n```"
    reply = parse_reply(text, tools_available=True)
    assert reply.tool_call == ToolCall(name="get_weather", arguments=arguments)
    assert reply.metadata == "get_weather "
    assert reply.content == f"```python\n{code}\n```"


def test_tool_call_without_fence_or_language_tag():
    assert parse_reply("search\ntool_call(q='x')", True).tool_call == ToolCall("search", {"q": "x"})
    assert parse_reply("search\n```\ntool_call(q='x')```", True).tool_call == ToolCall("search", {"q": "x"})


MALICIOUS = [
    "tool_call(x=__import__('os').system('echo hi'))",
    "__import__('os').system('echo hi')",
    "tool_call(x=open('/etc/passwd').read())",
    "tool_call(**x)",
    "tool_call(**dict(x=1))",
    "tool_call(**{1: 2})",
    "tool_call(**{'x': __import__('os').system('echo hi')})",
    "tool_call(**{**x})",
    "tool_call(x=1, **{'x': 2})",
    "tool_call('positional')",
    "tool_call(x=y)",
    "tool_call(x=(lambda: 1)())",
    "tool_call(x=[i for i in range(10**9)])",
    "tool_call(x=2**10**10)",
    "tool_call(x='a' * 10**9)",
    "os.system('echo hi')",
    "tool_call(x=1); import os",
    "tool_call(x=1",
    "not python at all ```",
    "",
    "tool_call(x=" + "[" * 10000 + "]" * 10000 + ")",
]


@pytest.mark.parametrize("code", MALICIOUS)
def test_unsafe_or_malformed_tool_calls_are_rejected(code, monkeypatch):
    import os
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a))
    text = f"get_weather\n```python\n{code}\n```"
    with pytest.raises(ToolCallError) as error:
        parse_reply(text, tools_available=True)
    assert calls == []
    assert isinstance(error.value, ValueError)
    assert "get_weather" in str(error.value)
    assert error.value.metadata == "get_weather" and code in error.value.content


def stream_filter(text, cuts):
    filt = ReplyTextFilter()
    visible = []
    for start, end in zip([0] + cuts, cuts + [len(text)]):
        visible.append(filt.feed(text[start:end]))
    visible.append(filt.finish())
    return visible, filt


def random_cuts(rng, text):
    return sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, 12)))) if len(text) > 1 else []


STREAM_TEXTS = [
    "\n你好！我是 ChatGLM3。\n\n有什么可以帮你？",
    "\n\n  leading and trailing whitespace \n\t ",
    "   \n   ",
    "",
    "no newline ever  ",
    "interpreter\n```python\nprint(1)\n```\n",
    "\nmultiple   inner   spaces  and \n\n paragraphs \n",
    "\n😀 emoji  \n",
    "\r\n windows line ends\r\n",
]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_streaming_filter_equals_parsed_content(text):
    rng = random.Random(text)
    expected = parse_reply(text, tools_available=False)
    for _ in range(50):
        visible, filt = stream_filter(text, random_cuts(rng, text))
        assert "".join(visible) == expected.content
        assert filt.metadata == expected.metadata


def test_streaming_filter_hides_metadata_and_holds_trailing_whitespace():
    filt = ReplyTextFilter()
    assert filt.metadata is None
    assert filt.feed("get_wea") == ""
    assert filt.feed("ther\n  Hel") == "Hel"
    assert filt.metadata == "get_weather"
    assert filt.feed("lo  ") == "lo"
    assert filt.feed(" world\n") == "   world"
    assert filt.finish() == ""


def test_streaming_filter_without_newline_flushes_at_finish():
    filt = ReplyTextFilter()
    assert filt.feed(" just text ") == ""
    assert filt.finish() == "just text"
    assert filt.metadata == ""


def test_a_long_first_line_is_content_and_streams_at_once():
    from chatglm_web.families.chatglm3.reply import MAX_METADATA_CHARS, ReplyTextFilter, parse_reply

    text = "x" * (MAX_METADATA_CHARS + 10) + "\nsecond line"
    stream = ReplyTextFilter()
    shown = [stream.feed(ch) for ch in text]
    assert any(shown[: MAX_METADATA_CHARS + 2]), "text must start streaming without waiting for a newline"
    assert "".join(shown) + stream.finish() == parse_reply(text, tools_available=False).content == text
