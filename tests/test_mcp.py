"""``--mcp``: the chat and the tools as an MCP server, tested with the official ``mcp`` client over loopback,
behind the same API key and login as the rest of the app."""

from __future__ import annotations

import asyncio
import base64
import json

import httpx
import openai
import pytest
from gradio_client import Client
from mcp import ClientSession
from mcp.client.streamable_http import streamablehttp_client

from server_harness import running_server

KEY = "mcp-test-key"
LOGIN = ("alice", "s3cret")


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def mcp_session(server, authorization: str | None, work):
    """Run ``work(session)`` in an MCP client session with the server; its result."""
    async def main():
        headers = {"Authorization": authorization} if authorization else None
        async with streamablehttp_client(server.url + "gradio_api/mcp/", headers=headers) as (read, write, _):
            async with ClientSession(read, write) as session:
                await session.initialize()
                return await work(session)

    return asyncio.run(main())


def tool_names(session):
    async def names():
        return sorted(tool.name for tool in (await session.list_tools()).tools)
    return names()


@pytest.fixture(scope="module")
def server(chatglm3_checkpoint):
    with running_server(model=str(chatglm3_checkpoint), api_key=KEY, mcp=True) as srv:
        yield srv


def test_the_client_lists_the_chat_and_every_tool(server):
    names = mcp_session(server, f"Bearer {KEY}", tool_names)
    assert names == sorted(["chat", *server.page.toolbox.registry.tools]), names
    assert {"calculator", "unit_conversion"} <= set(names)


def test_a_tool_runs_with_its_schema_checked(server):
    async def work(session):
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
        schema = tools["calculator"].inputSchema
        good = await session.call_tool("calculator", {"expression": "2**10 + 3 * 4"})
        bad = await session.call_tool("unit_conversion", {"value": 3, "from_unit": "m", "to_unit": "parsec"})
        return schema, good, bad

    schema, good, bad = mcp_session(server, f"Bearer {KEY}", work)
    assert schema["required"] == ["expression"] and schema["properties"]["expression"]["type"] == "string"
    assert not good.isError and json.loads(good.content[0].text)["result"] == 1036
    assert bad.isError and "parsec" in bad.content[0].text  # the registry's own message about the argument


def test_the_chat_tool_is_the_model_through_the_same_backend(server):
    """Greedy: the MCP chat's reply is the OpenAI API's reply to the same message, token for token."""
    async def work(session):
        tools = {tool.name: tool for tool in (await session.list_tools()).tools}
        reply = await session.call_tool("chat", {"message": "hello there", "temperature": 0, "max_new_tokens": 12,
                                                 "system_prompt": "Be brief."})
        wrong = await session.call_tool("chat", {"message": "hello", "temperature": 7})
        return tools["chat"].inputSchema, reply, wrong

    schema, reply, wrong = mcp_session(server, f"Bearer {KEY}", work)
    assert schema["required"] == ["message"]
    assert schema["properties"]["temperature"] == {"type": "number", "description": schema["properties"][
        "temperature"]["description"], "default": 0.8}
    api = openai.OpenAI(base_url=server.url + "v1", api_key=KEY, max_retries=0)
    expected = api.chat.completions.create(
        model="m", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello there"}],
        max_tokens=12, temperature=0).choices[0].message.content
    assert not reply.isError and reply.content[0].text == expected and expected
    assert wrong.isError and "temperature" in wrong.content[0].text


def test_the_mcp_routes_need_the_api_key(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": basic(*LOGIN)}):
        response = httpx.post(server.url + "gradio_api/mcp/", headers=headers, timeout=30,
                              json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        assert response.status_code == 401, headers
        assert response.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(Exception):
        mcp_session(server, "Bearer wrong", tool_names)


def test_the_pages_chat_endpoint_stays_for_gradio_clients_but_off_the_tool_list(server):
    client = Client(server.url, verbose=False)
    assert "/chat" not in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    reply, _ = client.predict("hi", "", 0.0, 0.8, 4, 0, 1.0, 1, "Chat", api_name="/chat")
    assert isinstance(reply, str) and reply


def test_behind_the_login_the_login_opens_the_mcp_server(chatglm3_checkpoint):
    with running_server(model=str(chatglm3_checkpoint), auth=":".join(LOGIN), mcp=True) as srv:
        for headers in ({}, {"Authorization": basic("alice", "wrong")}):
            response = httpx.post(srv.url + "gradio_api/mcp/", headers=headers, timeout=30,
                                  json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
            assert response.status_code == 401
        assert "calculator" in mcp_session(srv, basic(*LOGIN), tool_names)

        async def add(session):
            return await session.call_tool("calculator", {"expression": "40 + 2"})

        assert json.loads(mcp_session(srv, basic(*LOGIN), add).content[0].text)["result"] == 42
        # the page's own routes still need the page's login (its cookie), not these credentials
        for headers in ({}, {"Authorization": basic(*LOGIN)}):
            assert httpx.get(srv.url + "gradio_api/info", headers=headers, timeout=30).status_code == 401


def test_without_the_flag_there_is_no_mcp_server_and_chat_is_listed(chatglm3_checkpoint):
    with running_server(model=str(chatglm3_checkpoint)) as srv:
        response = httpx.post(srv.url + "gradio_api/mcp/", timeout=30,
                              json={"jsonrpc": "2.0", "id": 1, "method": "tools/list"})
        assert response.status_code == 404
        client = Client(srv.url, verbose=False)
        assert "/chat" in client.view_api(print_info=False, return_format="dict")["named_endpoints"]


def test_a_tool_becomes_a_typed_function_with_its_required_arguments_first():
    import inspect
    from pathlib import Path

    from chatglm_web.api.mcp import tool_endpoint
    from chatglm_web.tools.registry import Tool, ToolResult

    calls = []
    tool = Tool("convert", "Convert units.", {
        "type": "object", "required": ["value", "to"],
        "properties": {"unit": {"type": "string", "enum": ["m", "km"]}, "value": {"type": "number"},
                       "to": {"type": "string", "description": "target unit"}}}, Path("convert.py"))
    endpoint = tool_endpoint(tool, lambda name, arguments: calls.append((name, arguments)) or ToolResult(True, "ok"))
    signature = inspect.signature(endpoint)
    assert list(signature.parameters) == ["value", "to", "unit"]
    assert [p.annotation for p in signature.parameters.values()] == [float, str, str]
    assert signature.parameters["unit"].default is None and "one of \"m\", \"km\"" in endpoint.__doc__
    assert endpoint(3.0, "km") == "ok" and calls == [("convert", {"value": 3.0, "to": "km"})]
    with pytest.raises(ValueError, match="cannot be an MCP tool's argument"):
        tool_endpoint(Tool("bad", "x", {"type": "object", "properties": {"from-unit": {"type": "string"}}},
                           Path("bad.py")), lambda name, arguments: None)
