"""Tool calling on /v1/chat/completions with the official ``openai`` client: the app as a real server, the
model's replies scripted at the engine boundary (``ScriptedEngine``), the prompts it received checked."""

from __future__ import annotations

import json

import openai
import pytest

from scripted_engine import scripted_installer
from server_harness import running_server

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                   "required": ["city"]}}}
CALL = ("get_weather", '```python\ntool_call(city="北京", unit="celsius")\n```')
QUESTION = [{"role": "user", "content": "How warm is it in Beijing?"}]


@pytest.fixture(scope="module")
def server(long_reply_checkpoint):
    with running_server(model=str(long_reply_checkpoint)) as srv:
        srv.backend.backend.engine.shutdown()
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "v1", api_key="none", max_retries=0)


@pytest.fixture
def script(server, long_reply_checkpoint):
    return scripted_installer(server, long_reply_checkpoint)


def test_a_tool_call_comes_back_as_tool_calls(client, script):
    engine = script([CALL])
    reply = client.chat.completions.create(model="m", messages=QUESTION, tools=[WEATHER])
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "北京", "unit": "celsius"}
    prompt = engine.prompt_text(0)  # the tools are on the system message, in ChatGLM3's shape
    assert prompt.startswith("[gMASK]sop<|system|>") and "Answer the following questions" in prompt
    assert '"name": "get_weather"' in prompt and '"type": "function"' not in prompt


def test_a_streamed_tool_call_is_one_tool_calls_delta(client, script):
    script([("", "Let me look."), CALL])
    chunks = list(client.chat.completions.create(model="m", messages=QUESTION, tools=[WEATHER], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    calls = [d for c in chunks if c.choices for d in (c.choices[0].delta.tool_calls or [])]
    assert text == "Let me look." and "tool_call" not in text
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "北京", "unit": "celsius"}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_the_tool_result_round_trip_reaches_the_prompt_as_chatglm3_messages(client, script):
    engine = script([CALL], [("", "It is 21 degrees in Beijing.")])
    first = client.chat.completions.create(model="m", messages=QUESTION, tools=[WEATHER])
    call = first.choices[0].message.tool_calls[0]
    messages = [*QUESTION, first.choices[0].message.model_dump(exclude_none=True),
                {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21})}]
    second = client.chat.completions.create(model="m", messages=messages, tools=[WEATHER])
    assert second.choices[0].message.content == "It is 21 degrees in Beijing."
    assert second.choices[0].finish_reason == "stop" and not second.choices[0].message.tool_calls
    prompt = engine.prompt_text(1)
    assert "<|assistant|>get_weather\n" in prompt.replace("<|assistant|> get_weather", "<|assistant|>get_weather")
    assert "tool_call(city='北京', unit='celsius')" in prompt
    observation = prompt.split("<|observation|>")[1]
    assert observation.endswith("<|assistant|>") and observation[:-len("<|assistant|>")].strip() == '{"temperature": 21}'


def test_without_tools_or_with_tool_choice_none_a_reply_is_text(client, script):
    engine = script([("", "Plain answer.")], [("", "Another.")])
    assert client.chat.completions.create(model="m", messages=QUESTION).choices[0].message.content == "Plain answer."
    reply = client.chat.completions.create(model="m", messages=QUESTION, tools=[WEATHER], tool_choice="none")
    assert reply.choices[0].message.content == "Another." and "get_weather" not in engine.prompt_text(1)


@pytest.mark.parametrize("extra, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "tool_choice"),
    ({"tools": [{"type": "retrieval", "function": {"name": "x"}}]}, "tools.0.type"),
])
def test_unsupported_tool_options_are_a_400_naming_them(client, script, extra, param):
    script()
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(model="m", messages=QUESTION, **{"tools": [WEATHER], **extra})
    assert refused.value.body["param"] == param and param.split(".")[0] in refused.value.body["message"]


def test_a_call_that_does_not_parse_comes_back_as_text(client, script):
    script([("get_weather", "```python\ntool_call(city=open('/etc/passwd').read())\n```")])
    reply = client.chat.completions.create(model="m", messages=QUESTION, tools=[WEATHER])
    assert reply.choices[0].finish_reason == "stop" and not reply.choices[0].message.tool_calls
    assert "tool_call(" in reply.choices[0].message.content


def test_a_model_whose_family_cannot_call_tools_refuses_tools_and_tool_messages():
    """A chat-template model (the offline demo, say) has no tool-call dialect: a request with ``tools``, a tool
    call or a tool result is a 400 naming where, never ChatGLM3's tool messages written into its prompt."""
    from chatglm_web.api.openai_api import APIError, parse_chat_request

    def parse(body, model="demo-model"):
        return parse_chat_request(json.dumps(body).encode(), None, model)

    with pytest.raises(APIError) as error:
        parse({"model": "m", "messages": QUESTION, "tools": [WEATHER]})
    assert (error.value.status, error.value.param) == (400, "tools")
    assert error.value.message == "demo-model cannot call tools: send no tools, tool calls or tool results."
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}
    history = [*QUESTION, {"role": "assistant", "content": None, "tool_calls": [call]},
               {"role": "tool", "tool_call_id": "c1", "content": "21 °C"}]
    with pytest.raises(APIError) as error:
        parse({"model": "m", "messages": history})
    assert error.value.param == "messages[1]"
    _, _, tools, messages = parse({"model": "m", "messages": QUESTION})
    assert tools == [] and messages == QUESTION
    _, _, tools, _ = parse({"model": "m", "messages": history, "tools": [WEATHER]}, model=None)   # ChatGLM3: taken
    assert [tool["name"] for tool in tools] == ["get_weather"]
