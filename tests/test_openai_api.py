"""The app's own OpenAI-compatible API, /healthz and /metrics, through the official ``openai`` client."""

from __future__ import annotations

import asyncio
import base64
import threading

import httpx
import openai
import pytest
from gradio_client import Client

from chatglm_web.generation import SamplingParams
from server_harness import requests_ended, running_server
from waiting import wait_until

KEY = "test-key-123"
HELLO = [{"role": "user", "content": "hello"}]
TIMEOUT = 180  # seconds: only guards against a hang on a busy 2-core machine


@pytest.fixture(scope="module")
def server(long_reply_checkpoint):
    with running_server(model=str(long_reply_checkpoint), api_key=KEY, max_batch_size=8, max_queue=8) as srv:
        yield srv


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "v1", api_key=KEY, max_retries=0)


def test_models_lists_the_loaded_model(server, client):
    models = client.models.list().data
    assert [m.id for m in models] == [server.backend.info.name]


def test_completion_streamed_and_not_give_the_same_seeded_reply_and_usage(client):
    reply = client.chat.completions.create(model="m", messages=HELLO, max_tokens=12, seed=4, temperature=0.9)
    assert reply.choices[0].finish_reason == "length"
    assert reply.usage.completion_tokens == 12 and reply.usage.prompt_tokens > 3
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + 12
    chunks = list(client.chat.completions.create(model="m", messages=HELLO, max_tokens=12, seed=4, temperature=0.9,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 12
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"


def test_a_long_reply_arrives_in_many_chunks(client):
    chunks = list(client.chat.completions.create(model="m", messages=HELLO, max_tokens=400, stream=True))
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 3, "not streamed"


def test_sampling_values_reach_generation(client):
    def ask(**kw):
        return client.chat.completions.create(model="m", messages=HELLO, max_tokens=10, **kw).choices[0].message.content

    assert ask(seed=1, temperature=1.0) == ask(seed=1, temperature=1.0)
    assert ask(seed=1, temperature=1.0) != ask(seed=2, temperature=1.0)
    assert ask(temperature=0) == ask(temperature=0, seed=99)  # greedy ignores the seed
    # vLLM's extra sampling fields, as the openai client sends them
    assert ask(seed=1, temperature=1.0, extra_body={"top_k": 1}) == ask(temperature=0)
    assert ask(temperature=0, extra_body={"repetition_penalty": 2.0}) != ask(temperature=0)


def test_stop_strings_end_the_reply_before_them(client):
    full = client.chat.completions.create(model="m", messages=HELLO, max_tokens=40, seed=7).choices[0].message.content
    stop = full[10:13]
    assert stop and full.find(stop) >= 1
    reply = client.chat.completions.create(model="m", messages=HELLO, max_tokens=40, seed=7, stop=[stop, "\x00never"])
    assert reply.choices[0].message.content == full[:full.find(stop)]
    assert reply.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("values, param", [
    ({"temperature": 2.5}, "temperature"), ({"top_p": 0.0}, "top_p"), ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 10**9}, "max_tokens"), ({"seed": -1}, "seed"), ({"stop": ["x"] * 5}, "stop"),
    ({"temperature": "hot"}, "temperature"), ({"n": 2}, "n"),
])
def test_invalid_values_are_400_with_a_message(client, values, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=HELLO, **values)
    error = info.value.body
    assert error["type"] == "invalid_request_error" and error["param"] == param and param in error["message"]


@pytest.mark.parametrize("body", [b"{not json", b'{"messages": "hi"}', b'{"messages": [{"role": "wizard"}]}',
                                  b'{"messages": [{"role": "user", "content": "hi"}], "top_p": NaN}',
                                  b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}',
                                  b'{"messages": []}', b'{"messages": [{"role": "user", "content": "\\ud800"}]}'])
def test_malformed_requests_are_400(server, body):
    response = httpx.post(server.url + "v1/chat/completions", content=body,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json()["error"]["message"]


def test_no_or_wrong_key_is_401_and_healthz_stays_open(server):
    for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "Basic " + base64.b64encode(b"a:b").decode()}):
        for method, path in (("GET", "v1/models"), ("POST", "v1/chat/completions"), ("GET", "metrics")):
            response = httpx.request(method, server.url + path, headers=headers, json={"messages": HELLO})
            assert response.status_code == 401, (path, headers)
            assert response.json()["error"]["code"] == "invalid_api_key"
    health = httpx.get(server.url + "healthz")
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_auth_protects_the_api_like_the_page(long_reply_checkpoint):
    with running_server(model=str(long_reply_checkpoint), auth="alice:s3cret") as srv:
        assert httpx.get(srv.url + "v1/models").status_code == 401
        assert httpx.get(srv.url + "v1/models", auth=("alice", "wrong")).status_code == 401
        assert httpx.get(srv.url + "v1/models", auth=("alice", "s3cret")).status_code == 200


def test_api_and_page_users_share_one_batch(server):
    """6 API and 2 page users, as many as the batch holds, each asking for a 2000-token reply: all eight are seen
    writing their replies at once (each has streamed text, none has ended), so they share the engine's batch."""
    engine = server.engine
    release = threading.Event()   # set once all eight were seen mid-reply: the API users leave then
    streaming, errors = [], []

    def api_user(i):
        try:
            c = openai.OpenAI(base_url=server.url + "v1", api_key=KEY, max_retries=0)
            with c.chat.completions.create(model="m", messages=HELLO, max_tokens=2000, seed=i, stream=True) as stream:
                texts = 0
                for chunk in stream:
                    assert not (chunk.choices and chunk.choices[0].finish_reason), "the reply ended early"
                    texts += bool(chunk.choices and chunk.choices[0].delta.content)
                    if texts == 2:
                        streaming.append(f"api {i}")
                        release.wait(TIMEOUT)
                        break  # leaving closes the stream: the request is cancelled
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=api_user, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    jobs = [Client(server.url, verbose=False).submit("hi", "", 0.8, 0.8, 2000, 0, 1.0, i, api_name="/chat")
            for i in range(2)]
    try:
        wait_until(lambda: errors or (len(streaming) == 6 and all(len(job.outputs()) >= 2 for job in jobs)), TIMEOUT,
                   "all eight users to stream their replies")
        assert not errors, errors
        assert not any(job.done() for job in jobs), "a page reply ended early"
        assert engine.load == (8, 0), "API and page requests did not run in one batch"
    finally:
        release.set()
        for job in jobs:
            job.cancel()
        for thread in threads:
            thread.join(TIMEOUT)
    assert not errors, errors
    wait_until(lambda: engine.load == (0, 0), TIMEOUT, "every request to be cancelled")


def test_disconnect_mid_stream_cancels_the_generation(server):
    before = requests_ended(server, "cancelled")

    async def read_a_little():
        async with httpx.AsyncClient() as http:
            async with http.stream("POST", server.url + "v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                                   json={"messages": HELLO, "max_tokens": 2000, "stream": True}) as response:
                async for line in response.aiter_lines():
                    if '"content": "' in line and '"content": ""' not in line:
                        break

    asyncio.run(read_a_little())
    # ended as cancelled (not run to its 2000 tokens), and its slot is free
    wait_until(lambda: requests_ended(server, "cancelled") > before, TIMEOUT, "the request to be cancelled")
    wait_until(lambda: server.engine.load == (0, 0), TIMEOUT, "the slot to be free")
    assert requests_ended(server, "cancelled") == before + 1


def test_busy_is_429(long_reply_checkpoint):
    with running_server(model=str(long_reply_checkpoint), max_batch_size=1, max_queue=0) as srv:
        c = openai.OpenAI(base_url=srv.url + "v1", api_key="unused", max_retries=0)
        holder = srv.engine.submit([5, 6, 7], SamplingParams(max_new_tokens=2000), [])
        try:
            with pytest.raises(openai.RateLimitError) as info:
                c.chat.completions.create(model="m", messages=HELLO, max_tokens=5)
            assert "busy" in info.value.body["message"]
        finally:
            holder.cancel()


def test_metrics_count_requests_tokens_and_latencies(server, client):
    def scrape():
        text = httpx.get(server.url + "metrics", headers={"Authorization": f"Bearer {KEY}"}).text
        values = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                values[name] = float(value)
        return values

    before = scrape()
    client.chat.completions.create(model="m", messages=HELLO, max_tokens=7)
    after = scrape()
    assert after['chatglm_web_requests_finished_total{reason="length"}'] == \
        before['chatglm_web_requests_finished_total{reason="length"}'] + 1
    assert after["chatglm_web_generated_tokens_total"] == before["chatglm_web_generated_tokens_total"] + 7
    assert after["chatglm_web_time_to_first_token_seconds_count"] == \
        before["chatglm_web_time_to_first_token_seconds_count"] + 1
    assert after["chatglm_web_time_per_output_token_seconds_count"] == \
        before["chatglm_web_time_per_output_token_seconds_count"] + 1
    assert after["chatglm_web_requests_running"] == 0 and after["chatglm_web_requests_waiting"] == 0
