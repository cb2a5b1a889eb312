"""Issue 17: a client's tool-call arguments written into the ChatGLM3 prompt (``api_tools.call_message``) read back
(``chatglm3.reply.parse_reply``) as an equal dict, whatever the names: keywords, spaces, '=', quotes, unicode, the
empty string. Before, ``{"x=1, y": 2}`` was written as ``tool_call(x=1, y=2)`` and read back as two arguments.
NaN and Infinity are not JSON: they are refused with a 400."""

from __future__ import annotations

import json
import keyword

import openai
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from chatglm_web.api.tool_calls import ReplyParts, call_message, tool_calls_out
from chatglm_web.families.chatglm3.reply import parse_reply
from chatglm_web.generation import InvalidRequest, ReplyMetadata, TextDelta
from scripted_engine import scripted_installer
from server_harness import running_server

# any text: every unicode category, lone surrogates included (JSON can carry them as \ud800 escapes)
TEXT = st.text(st.characters(exclude_categories=()), max_size=12)
NAMES = st.one_of(TEXT, st.sampled_from(keyword.kwlist + keyword.softkwlist + [
    "", " ", "a b", "x=1, y", "x=1, **{'y': 2}", "'", '"', "\\", "\n", ")", "**", "__debug__", "ﬁle", "ǅ", "变量",
    "1st", "tool_call", "__import__('os')"]))
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False) | TEXT
    | st.integers() | st.integers(min_value=-10**4299, max_value=10**4299),  # json.loads' 4300-digit limit
    lambda children: st.lists(children, max_size=4) | st.dictionaries(TEXT, children, max_size=4),
    max_leaves=12)


def written_and_read_back(arguments: dict) -> tuple[dict, dict]:
    """(what the model's prompt says, parsed back; what the API would return if the model made that call)."""
    message = call_message({"id": "c", "type": "function",
                            "function": {"name": "get_weather", "arguments": json.dumps(arguments)}})
    parsed = parse_reply(f"{message['metadata']}\n{message['content']}", tools_available=True).tool_call
    assert parsed.name == "get_weather"
    reply = ReplyParts()
    for event in (ReplyMetadata(message["metadata"]), TextDelta(message["content"])):
        reply.add(event)
    [call] = tool_calls_out(reply)
    return parsed.arguments, json.loads(call["function"]["arguments"])


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.dictionaries(NAMES, JSON_VALUES, max_size=6))
@example({"x=1, y": 2})
@example({"a b": 1, "class": 1, "": None, "ok": [1.5, -0.0, 10**300]})
@example({"ﬁ": "NFKC would read this name as 'fi'", "__debug__": True})
def test_every_json_object_of_arguments_reads_back_equal(arguments):
    received = json.loads(json.dumps(arguments))  # as the API gets it ("\\ud800\\udc00" arrives as one character)
    from_prompt, from_api = written_and_read_back(arguments)
    assert from_prompt == received
    assert from_api == received


@pytest.mark.parametrize("text", ['{"x": NaN}', '{"x": Infinity}', '{"x": [-Infinity]}'])
def test_nan_and_infinity_arguments_are_refused_as_not_json(text):
    with pytest.raises(InvalidRequest) as refused:
        call_message({"function": {"name": "f", "arguments": text}})
    assert "not valid JSON" in str(refused.value) and "NaN and Infinity are not JSON" in str(refused.value)


# -- through the real API: the client's call reaches the prompt, and the same call made by the model comes back --

ODD = {"x=1, y": 2, "a b": 1, "class": [1, {"k": None}], "": "empty", "quote'\"": "v", "ok": 1e-7}
WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}


@pytest.fixture(scope="module")
def server(long_reply_checkpoint):
    with running_server(model=str(long_reply_checkpoint)) as srv:
        srv.backend.backend.engine.shutdown()
        yield srv


def test_odd_names_through_the_api(server, long_reply_checkpoint):
    client = openai.OpenAI(base_url=server.url + "v1", api_key="none", max_retries=0)
    engine = scripted_installer(server, long_reply_checkpoint)([])
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
                    "name": "get_weather", "arguments": json.dumps(ODD)}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    client.chat.completions.create(model="m", messages=messages, tools=[WEATHER])
    prompt = engine.prompt_text(0)
    code = prompt.split("```python\n", 1)[1].split("\n```", 1)[0]
    assert parse_reply(f"get_weather\n```python\n{code}\n```", tools_available=True).tool_call.arguments == ODD
    # the model makes exactly that call: the API hands the client the same arguments
    scripted_installer(server, long_reply_checkpoint)([("get_weather", f"```python\n{code}\n```")])
    reply = client.chat.completions.create(model="m", messages=messages[:1], tools=[WEATHER])
    assert json.loads(reply.choices[0].message.tool_calls[0].function.arguments) == ODD


def test_nan_arguments_are_a_400_through_the_api(server):
    client = openai.OpenAI(base_url=server.url + "v1", api_key="none", max_retries=0)
    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"t": NaN}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="m", messages=messages, tools=[WEATHER])
    assert "NaN and Infinity are not JSON" in refused.value.body["message"]
    assert refused.value.body["param"] == "messages"
