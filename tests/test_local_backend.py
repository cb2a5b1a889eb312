"""LocalBackend input handling: limits checked before tokenizing, fitting cost, reply budget, log lines."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest

from synthetic_checkpoints import TinyChatGLM3, write_checkpoint
from chatglm_web.engine.scheduler import Engine
from chatglm_web.generation import BackendBusy, InvalidRequest, SamplingParams, TextDelta
from chatglm_web.families.loading import load_from_folder
from chatglm_web.backends.local import LocalBackend
from chatglm_web.settings import Settings
from chat_helpers import collect, user
from conftest import NO_STOP


@pytest.fixture(scope="module")
def loaded(long_reply_checkpoint):
    return load_from_folder(long_reply_checkpoint, Settings(precision="fp32", device="cpu"), "tiny")


@pytest.fixture
def backend(loaded):
    engine = Engine(loaded.model, max_batch_size=2, max_queue=1)
    yield LocalBackend(engine, loaded.chat_format, loaded.info, max_input_chars=1000)
    engine.shutdown()


def run(backend, messages, params=SamplingParams(max_new_tokens=5, seed=0)):
    return asyncio.run(collect(backend, messages, params))


def test_character_limit_is_checked_before_any_tokenizing(backend, monkeypatch):
    tokenized = []
    monkeypatch.setattr(backend.format, "message_tokens", lambda m: tokenized.append(m) or 1)
    for messages in (user("x" * 1001), [{"role": "system", "content": "s" * 5000}] + user("hi"),
                     [{"role": "user", "content": "y" * 20_000_000}]):
        with pytest.raises(InvalidRequest, match=r"too long: [\d,]+ characters, the limit is 1,000"):
            run(backend, messages)
    assert tokenized == []
    assert backend.engine.load == (0, 0)


def test_the_default_character_limit_follows_the_context(loaded):
    engine = Engine(loaded.model)
    try:
        backend = LocalBackend(engine, loaded.chat_format, loaded.info)
        assert backend.max_input_chars == 8 * loaded.info.context_length
    finally:
        engine.shutdown()


@pytest.mark.parametrize("text, match", [
    ("\ud800 hello", "invalid character"), ("", "empty"), ("   \n", "empty"),
])
def test_unusable_text_gets_a_clear_message(backend, text, match):
    with pytest.raises(InvalidRequest, match=match):
        run(backend, user(text))
    with pytest.raises(InvalidRequest, match="invalid character"):
        run(backend, [{"role": "system", "content": "be nice \udfff"}] + user("hi"))


def test_control_characters_and_nul_are_ordinary_text(backend):
    text, done = run(backend, user("a\x00b\x07c\x1b[31m\u202e\ufeff"))
    assert done.reason == "length" and done.completion_tokens == 5


def test_tokenizing_runs_off_the_event_loop(backend, monkeypatch):
    threads = set()
    real = backend.format.prompt_ids

    def spy(messages):
        threads.add(threading.current_thread())
        return real(messages)

    monkeypatch.setattr(backend.format, "prompt_ids", spy)
    run(backend, user("hello"))
    assert threads and threading.main_thread() not in threads


def test_a_long_history_is_tokenized_only_as_far_as_the_context_reaches(backend, monkeypatch):
    """420 kB of history: only the newest messages that can fit are tokenized, each once."""
    measured = []
    real = backend.format.message_tokens
    monkeypatch.setattr(backend.format, "message_tokens", lambda m: measured.append(m["content"]) or real(m))
    history = []
    for i in range(600):
        history += [{"role": "user", "content": f"question {i} " + "word " * 70},
                    {"role": "assistant", "content": f"answer {i} " + "text " * 70}]
    history.append({"role": "user", "content": "the newest question"})
    assert sum(len(m["content"]) for m in history) > 420_000
    text, done = run(backend, history)
    assert done.dropped_messages > 1000
    assert len(measured) < 200 and len(measured) == len(set(measured))


def test_busy_is_refused_before_tokenizing(backend, monkeypatch):
    params = SamplingParams(max_new_tokens=2000, seed=0)
    engine = backend.engine
    holders = [engine.submit([5, 6, 7], params, []) for _ in range(3)]  # 2 running + 1 waiting = full
    tokenized = []
    monkeypatch.setattr(backend.format, "message_tokens", lambda m: tokenized.append(m) or 1)
    try:
        with pytest.raises(BackendBusy, match="busy: 2 replies are being written and 1 are waiting"):
            run(backend, user("hi"))
        assert tokenized == []
    finally:
        for request in holders:
            request.cancel()


def test_a_reply_budget_beyond_the_context_is_lowered_and_reported(tmp_path, tokenizer_model):
    folder = write_checkpoint(tmp_path / "ctx512", TinyChatGLM3(seq_length=512), tokenizer_model=tokenizer_model,
                              token_bias=NO_STOP, seed=3)
    loaded = load_from_folder(folder, Settings(precision="fp32", device="cpu"), "ctx512")
    assert loaded.info.context_length == 512
    engine = Engine(loaded.model, context_length=512)
    try:
        backend = LocalBackend(engine, loaded.chat_format, loaded.info)
        # the page's default for this model: max_new_tokens = the whole context
        text, done = run(backend, user("hello there"), SamplingParams(max_new_tokens=512, seed=1))
    finally:
        engine.shutdown()
    assert done.reason == "length"
    assert done.max_new_tokens_clamped == 512 - done.prompt_tokens
    assert done.completion_tokens == done.max_new_tokens_clamped


def test_each_request_logs_one_outcome_line_without_traceback(backend, caplog):
    caplog.set_level(logging.INFO, logger="chatglm_web")

    async def stop_early():
        stream = backend.stream_chat(user("go"), SamplingParams(max_new_tokens=500))
        async for event in stream:
            if isinstance(event, TextDelta):
                break
        await stream.aclose()

    run(backend, user("hi"))
    asyncio.run(stop_early())
    with pytest.raises(InvalidRequest):
        run(backend, user("x" * 5000))
    lines = [r.getMessage() for r in caplog.records if r.name == "chatglm_web.requests"]
    assert len(lines) == 3, lines
    assert "length" in lines[0] and "reply 5 tokens" in lines[0]
    assert "cancelled" in lines[1]
    assert "invalid" in lines[2] and "too long" in lines[2]
    assert not any(r.exc_info for r in caplog.records)


def test_chatglm3_metadata_lines_are_events_before_their_text(loaded):
    """A reply of a sentence, then ``<|assistant|>`` and a call: text, ReplyMetadata(name), the call's text;
    ``Finished.metadata`` names the last message's tool; a plain reply has no ReplyMetadata at all."""
    from chatglm_web.generation import Finished, ReplyMetadata
    from scripted_engine import ScriptedEngine

    tokenizer = loaded.chat_format.tokenizer
    call = "```python\ntool_call(x=1)\n```"
    engine = ScriptedEngine(tokenizer, [[("", "Let me see."), ("lookup", call)], [("", "Plain.")]])
    backend = LocalBackend(engine, loaded.chat_format, loaded.info)

    async def events():
        return [e async for e in backend.stream_chat(user("hi"), SamplingParams())]

    first = [e for e in asyncio.run(events()) if not isinstance(e, Finished)] + [asyncio.run(events())]
    kinds = [(type(e).__name__, getattr(e, "text", None)) for e in first[:-1]]
    text_before = "".join(t for k, t in kinds[:kinds.index(("ReplyMetadata", "lookup"))] if k == "TextDelta")
    text_after = "".join(t for k, t in kinds[kinds.index(("ReplyMetadata", "lookup")) + 1:] if k == "TextDelta")
    assert text_before == "Let me see." and text_after == call
    assert [e for e in first[-1] if isinstance(e, ReplyMetadata)] == []
    assert first[-1][-1].metadata == "" and "".join(e.text for e in first[-1] if isinstance(e, TextDelta)) == "Plain."
