"""The real Gradio server on loopback with a generated tiny ChatGLM3 model, driven through gradio_client."""

from __future__ import annotations

from functools import partial

import pytest
from gradio_client import Client
from transformers import GlmForCausalLM

from server_harness import chat_args as http_chat_args
from server_harness import requests_ended, running_server, sse_events
from waiting import wait_until

SYSTEM = "You are a test assistant."


chat_args = partial(http_chat_args, system=SYSTEM)  # the /chat endpoint's inputs, with this module's system prompt


@pytest.fixture(scope="module")
def load_counter():
    calls = []
    original = GlmForCausalLM.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        calls.append(args)
        return original(cls, *args, **kwargs)

    GlmForCausalLM.from_pretrained = classmethod(counting)
    yield calls
    GlmForCausalLM.from_pretrained = classmethod(original)


@pytest.fixture(scope="module")
def server(long_reply_checkpoint, load_counter):
    with running_server(model=str(long_reply_checkpoint), max_input_tokens=400, max_new_tokens=4096) as srv:
        yield srv


@pytest.fixture
def client(server):
    return Client(server.url, verbose=False)


def run(client, *args, **kwargs):
    job = client.submit(*chat_args(*args, **kwargs), api_name="/chat")
    for _ in job:  # consume the stream so job.outputs() holds every increment
        pass
    return job, job.result(timeout=120)


def test_reply_streams_in_several_increments(client):
    job, (reply, stats) = run(client, "Tell me a long story", max_new_tokens=1000, seed=3)
    texts = [out[0] for out in job.outputs() if out and out[0]]
    growing = [t for t in texts if not t.startswith("⏳")]
    assert len(set(growing)) >= 3, f"expected several increments, got {len(set(growing))}"
    for earlier, later in zip(growing, growing[1:]):
        assert later.startswith(earlier)
    assert growing[-1] == reply
    assert "reply 1000 tokens" in stats and "tokens/s" in stats and "prompt" in stats


def test_seeded_runs_repeat_and_temperature_changes_the_reply(server):
    replies = [run(Client(server.url, verbose=False), "Hello", seed=7, temperature=t)[1][0] for t in (0.9, 0.9, 1.6)]
    assert replies[0] == replies[1]
    assert replies[2] != replies[0]
    unseeded = {run(Client(server.url, verbose=False), "Hello", seed=-1)[1][0] for _ in range(2)}
    assert len(unseeded) == 2


def test_sliders_reach_generation(server, monkeypatch):
    seen = []
    original = server.engine.submit

    def spy(prompt_ids, params, stop_ids=()):
        seen.append((prompt_ids, params))
        return original(prompt_ids, params, stop_ids)

    monkeypatch.setattr(server.engine, "submit", spy)
    run(Client(server.url, verbose=False), "Hi", temperature=0.35, top_p=0.55, max_new_tokens=9, top_k=17,
        repetition_penalty=1.2, seed=123)
    params = seen[-1][1]
    assert (params.temperature, params.top_p, params.max_new_tokens, params.top_k) == (0.35, 0.55, 9, 17)
    assert (params.repetition_penalty, params.seed) == (1.2, 123)


def test_system_prompt_and_history_reach_the_prompt_ids(server, monkeypatch):
    seen = []
    original = server.engine.submit
    monkeypatch.setattr(server.engine, "submit", lambda ids, p, s=(): seen.append(ids) or original(ids, p, s))
    client = Client(server.url, verbose=False)
    _, (first_reply, _) = run(client, "第一个问题", system="你是一个测试助手。", seed=1, max_new_tokens=8)
    run(client, "second question", system="你是一个测试助手。", seed=1, max_new_tokens=8)
    tokenizer = server.backend.format.tokenizer
    assert seen[0] == tokenizer.build_chat_input([
        {"role": "system", "content": "你是一个测试助手。"}, {"role": "user", "content": "第一个问题"}])
    assert seen[1] == tokenizer.build_chat_input([
        {"role": "system", "content": "你是一个测试助手。"}, {"role": "user", "content": "第一个问题"},
        {"role": "assistant", "content": first_reply}, {"role": "user", "content": "second question"}])


def test_context_is_trimmed_with_a_notice(server):
    client = Client(server.url, verbose=False)
    long_text = "hello world " * 20  # about 160 tokens: the third turn no longer fits max_input_tokens=400
    notices = []
    for i in range(4):
        _, (_, stats) = run(client, f"{i} {long_text}", seed=i, max_new_tokens=4)
        notices.append(stats)
    assert "left out" not in notices[0]
    assert any("oldest" in s and "left out" in s for s in notices[1:])


def test_too_long_message_is_a_clear_error_and_server_survives(server):
    client = Client(server.url, verbose=False)
    with pytest.raises(Exception) as info:
        run(client, "word " * 2000)
    assert "too long" in str(info.value)
    _, (reply, stats) = run(client, "still there?", max_new_tokens=5, seed=2)
    assert "reply 5 tokens" in stats


def test_out_of_range_values_are_clear_errors(server):
    client = Client(server.url, verbose=False)
    with pytest.raises(Exception) as info:  # SamplingParams names the option and its range
        run(client, "hi", top_p=0.0)
    assert "top_p must be a number between 0.05 and 1.0" in str(info.value)
    with pytest.raises(Exception) as info:  # a seed beyond int64 passes Gradio and is caught by SamplingParams
        run(client, "hi", seed=2**70)
    assert "seed" in str(info.value)
    _, (_, stats) = run(client, "fine again", max_new_tokens=3)
    assert "reply 3 tokens" in stats


def test_stop_ends_a_long_reply_early(server):
    client = Client(server.url, verbose=False)
    cancelled_before = requests_ended(server, "cancelled")
    job = client.submit(*chat_args("Write forever", max_new_tokens=4000, seed=5), api_name="/chat")
    wait_until(lambda: len(job.outputs()) >= 3, 60, "three streamed updates")
    job.cancel()
    # the reply was ended as cancelled, not run to its 4000 tokens, and its slot is free
    wait_until(lambda: requests_ended(server, "cancelled") > cancelled_before, 30, "the request to be cancelled")
    wait_until(lambda: server.engine.load == (0, 0), 30, "the slot to be free")
    assert requests_ended(server, "cancelled") == cancelled_before + 1


def test_model_loads_once_across_many_requests(server, load_counter):
    for i in range(5):
        run(Client(server.url, verbose=False), f"request {i}", max_new_tokens=3)
    assert len(load_counter) == 1


def test_a_disconnected_client_has_its_request_cancelled(server):
    """An HTTP client that drops the stream mid-reply frees its slot; nothing generates for nobody."""
    import httpx

    cancelled_before = requests_ended(server, "cancelled")
    with httpx.Client(base_url=server.url, timeout=30) as http:
        data = chat_args("Write forever", max_new_tokens=4000)
        event_id = http.post("gradio_api/call/chat", json={"data": data}).json()["event_id"]
        with http.stream("GET", f"gradio_api/call/chat/{event_id}") as response:
            for count, _ in enumerate(sse_events(response.iter_lines()), 1):
                if count >= 3:
                    break  # leave: the connection closes here
    wait_until(lambda: requests_ended(server, "cancelled") > cancelled_before, 30, "the request to be cancelled")
    wait_until(lambda: server.engine.load == (0, 0), 30, "the slot to be free")
    assert requests_ended(server, "cancelled") == cancelled_before + 1
