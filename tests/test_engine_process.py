"""The engine in its own process: the same replies as the in-process engine, cancel frees the slot, limits hold,
no request is lost, and a dead engine process ends open requests with an error instead of hanging them."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

from chat_helpers import collect, collect_together, user
from chatglm_web.engine.admission import EngineBusy
from chatglm_web.engine.events import Done, QueuePosition, Token
from chatglm_web.engine.scheduler import Engine
from chatglm_web.generation import FinishReason
from chatglm_web.engine.process import EngineProcess, EngineStartError
from chatglm_web.generation import SamplingParams
from chatglm_web.families.loading import load_from_folder
from chatglm_web.backends.local import LocalBackend
from chatglm_web.settings import Settings
from waiting import wait_until

SETTINGS = [SamplingParams(temperature=t, top_p=p, top_k=k, seed=s, max_new_tokens=n)
            for t, p, k, s, n in [(0.7, 0.9, 0, 1, 30), (1.3, 1.0, 0, 2, 45), (0.0, 1.0, 0, 3, 20),
                                  (1.0, 0.5, 20, 4, 60)]]
PROMPTS = [user("hello"), user("你好，世界"), user("a longer prompt " * 5), user("x")]


def settings_for(folder) -> Settings:
    return Settings(model=str(folder), precision="fp32", device="cpu", model_explicit=True)


@pytest.fixture(scope="module")
def process_engine(long_reply_checkpoint):
    engine, chat_format, info = EngineProcess.start(settings_for(long_reply_checkpoint), max_batch_size=4,
                                                    max_queue=2)
    yield engine, chat_format, info
    engine.shutdown()


def test_replies_equal_the_in_process_engine_alone_and_batched(process_engine, long_reply_checkpoint):
    engine, chat_format, info = process_engine
    loaded = load_from_folder(long_reply_checkpoint, Settings(precision="fp32", device="cpu"), "tiny")
    local = Engine(loaded.model)
    try:
        expected = [asyncio.run(collect(LocalBackend(local, loaded.chat_format, loaded.info), m, p))[0]
                    for m, p in zip(PROMPTS, SETTINGS)]
    finally:
        local.shutdown()
    backend = LocalBackend(engine, chat_format, info)
    assert info.context_length == loaded.info.context_length and info.precision == loaded.info.precision

    alone = [asyncio.run(collect(backend, m, p)) for m, p in zip(PROMPTS, SETTINGS)]
    batched = asyncio.run(collect_together(backend, PROMPTS, SETTINGS))
    assert [text for text, _ in alone] == expected
    assert [text for text, _ in batched] == expected
    assert [done.completion_tokens for _, done in batched] == [p.max_new_tokens for p in SETTINGS]
    # requests share the engine process's batch: four long replies (its max batch size) are all written at once,
    # none told to wait for a slot
    running = [engine.submit([5, 6, 7], SamplingParams(seed=i, max_new_tokens=5000), []) for i in range(4)]
    try:
        started = [[next(iter(request)) for _ in range(3)] for request in running]
        assert all(isinstance(event, Token) for events in started for event in events), started
        assert engine.load == (4, 0), "the requests did not share a batch in the engine process"
    finally:
        for request in running:
            request.cancel()
    assert [list(request)[-1] for request in running] == [Done(FinishReason.CANCELLED)] * 4
    wait_until(lambda: engine.load == (0, 0), 30, "an idle engine")


def test_cancel_frees_the_slot_in_the_engine_process(process_engine):
    engine, _, _ = process_engine
    params = SamplingParams(seed=0, max_new_tokens=5000)
    running = [engine.submit([5, 6, 7], params, []) for _ in range(4)]
    firsts = [next(iter(request)) for request in running]
    assert all(isinstance(event, Token) for event in firsts)
    waiting = engine.submit([5, 6, 7], SamplingParams(seed=1, max_new_tokens=3), [])
    running[0].cancel()
    assert list(running[0])[-1] == Done(FinishReason.CANCELLED)
    events = list(waiting)  # admitted into the freed slot, then it runs to its end
    assert [type(e) for e in events].count(Token) == 3 and events[-1].reason == "length"
    for request in running[1:]:
        request.cancel()
        assert list(request)[-1] == Done(FinishReason.CANCELLED)
    wait_until(lambda: engine.load == (0, 0), 30, "an idle engine")


def test_batch_plus_queue_are_admitted_and_no_more(process_engine):
    engine, _, _ = process_engine
    params = SamplingParams(seed=0, max_new_tokens=5000)
    accepted = [engine.submit([5, 6, 7], params, []) for _ in range(6)]
    try:
        with pytest.raises(EngineBusy, match="4 replies are being written and 2 are waiting"):
            engine.submit([5, 6, 7], params, [])
        assert engine.load == (4, 2)
        positions = [[e.position for e in _take(r, 1)] for r in accepted[4:]]
        assert positions == [[1], [2]]
    finally:
        for request in accepted:
            request.cancel()
    for request in accepted:
        assert isinstance(list(request)[-1], Done)
    wait_until(lambda: engine.load == (0, 0), 30, "an idle engine")


def _take(request, count):
    events = []
    for event in request:
        events.append(event)
        if len(events) == count:
            break
    return events


def test_no_request_is_lost_under_a_flood(process_engine):
    engine, chat_format, info = process_engine
    backend = LocalBackend(engine, chat_format, info)

    async def flood():
        async def one(i):
            try:
                text, done = await collect(backend, user(f"q{i}"), SamplingParams(seed=i, max_new_tokens=8))
                return done.reason
            except Exception as error:
                return type(error).__name__

        return await asyncio.gather(*[one(i) for i in range(16)])

    outcomes = asyncio.run(flood())
    assert outcomes.count("length") == 6 and outcomes.count("EngineBusy") == 10, outcomes
    wait_until(lambda: engine.load == (0, 0), 30, "an idle engine")


def test_a_dead_engine_process_ends_open_requests_with_an_error(long_reply_checkpoint):
    engine, chat_format, info = EngineProcess.start(settings_for(long_reply_checkpoint))
    backend = LocalBackend(engine, chat_format, info)
    try:
        request = engine.submit([5, 6, 7], SamplingParams(seed=0, max_new_tokens=5000), [])
        assert isinstance(next(iter(request)), Token)
        os.kill(engine.pid, signal.SIGKILL)
        last = list(request)[-1]
        assert isinstance(last, Done) and last.reason == "error" and "engine stopped" in last.error
        wait_until(lambda: not engine.alive, 30, "the engine to be seen dead")
        ready, account = asyncio.run(backend.health())
        assert not ready and "stopped" in account
        with pytest.raises(RuntimeError, match="stopped"):
            engine.submit([5, 6, 7], SamplingParams(seed=0, max_new_tokens=5), [])
    finally:
        engine.shutdown()


def test_a_model_that_cannot_load_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(EngineStartError) as info:
        EngineProcess.start(settings_for(tmp_path))
    assert "\n" not in str(info.value) and str(info.value)


def test_shutdown_ends_the_engine_process(long_reply_checkpoint):
    engine, _, _ = EngineProcess.start(settings_for(long_reply_checkpoint))
    request = engine.submit([5, 6, 7], SamplingParams(seed=0, max_new_tokens=5000), [])
    next(iter(request))
    pid = engine.pid
    engine.shutdown()
    assert isinstance(list(request)[-1], Done)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
