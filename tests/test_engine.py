"""The batching engine and LocalBackend: per-request sampling, cancellation, queue limits, no lost requests."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from chatglm_web.engine.admission import EngineBusy
from chatglm_web.engine.events import Done, QueuePosition, Token
from chatglm_web.engine.scheduler import Engine
from chatglm_web.generation import BackendBusy, FinishReason, InvalidRequest, Queued, SamplingParams, TextDelta
from chatglm_web.families.loading import load_from_folder
from chatglm_web.backends.local import LocalBackend, fit_to_context
from chatglm_web.settings import Settings
from waiting import wait_until


@pytest.fixture(scope="module")
def loaded(long_reply_checkpoint):
    return load_from_folder(long_reply_checkpoint, Settings(precision="fp32", device="cpu"), "tiny")


@pytest.fixture
def backend(loaded):
    engine = Engine(loaded.model, max_batch_size=8, max_queue=4)
    yield LocalBackend(engine, loaded.chat_format, loaded.info)
    engine.shutdown()


def user(text):
    return [{"role": "user", "content": text}]


async def collect(backend, messages, params):
    text, done, queued = "", None, []
    async for event in backend.stream_chat(messages, params):
        if isinstance(event, TextDelta):
            text += event.text
        elif isinstance(event, Queued):
            queued.append(event.position)
        else:
            done = event
    return text, done, queued


class StepSpy:
    """Counts what an engine's model step (``engine.step``, ``chatglm_web/engine/step.py``) is asked to run:
    decode steps with their batch sizes, and prefill forwards."""

    def __init__(self, engine):
        self.decode_batches: list[int] = []
        self.prefills = 0
        step = engine.step
        decode, chunk, together = step.decode, step.prefill_chunk, step.prefill_together

        def spied_decode(last_tokens, *args):
            self.decode_batches.append(len(last_tokens))
            return decode(last_tokens, *args)

        def spied_prefill(fn):
            def run(*args):
                self.prefills += 1
                return fn(*args)
            return run

        step.decode, step.prefill_chunk, step.prefill_together = spied_decode, spied_prefill(chunk), spied_prefill(together)

    @property
    def steps(self) -> int:
        return len(self.decode_batches)


def test_batched_requests_match_each_request_run_alone(backend):
    settings = [SamplingParams(temperature=t, top_p=p, top_k=k, seed=s, max_new_tokens=n)
                for t, p, k, s, n in [(0.7, 0.9, 0, 1, 30), (1.3, 1.0, 0, 2, 45), (0.0, 1.0, 0, 3, 20),
                                      (1.0, 0.5, 20, 4, 60)]]
    prompts = [user("hello"), user("你好，世界"), user("a longer prompt " * 5), user("x")]

    async def alone():
        return [await collect(backend, m, p) for m, p in zip(prompts, settings)]

    async def together():
        return await asyncio.gather(*[collect(backend, m, p) for m, p in zip(prompts, settings)])

    solo = asyncio.run(alone())
    spy = StepSpy(backend.engine)
    batched = asyncio.run(together())
    assert max(spy.decode_batches) >= 3, "the requests did not share a batch"
    for (a, da, _), (b, db, _), p in zip(solo, batched, settings):
        assert a == b
        assert da.completion_tokens == db.completion_tokens == p.max_new_tokens
    assert len({text for text, _, _ in solo}) == 4


def test_cancelling_one_request_leaves_the_others_intact(backend):
    params = [SamplingParams(seed=s, max_new_tokens=40) for s in range(3)]
    solo = [asyncio.run(collect(backend, user(f"q{i}"), p))[0] for i, p in enumerate(params)]
    engine = backend.engine
    requests = [engine.submit(backend.prepare(user(f"q{i}"), p)[0], p, backend.format.stop_token_ids)
                for i, p in enumerate(params)]
    victim = engine.submit(backend.prepare(user("long"), SamplingParams(max_new_tokens=4000))[0],
                           SamplingParams(max_new_tokens=4000), backend.format.stop_token_ids)
    victim_events = []
    for event in victim:
        victim_events.append(event)
        if len(victim_events) == 5:
            victim.cancel()
    assert victim_events[-1] == Done(FinishReason.CANCELLED) and len(victim_events) < 20
    for request, expected in zip(requests, solo):
        stream = backend.format.text_stream()
        text = "".join(stream.push(e.id) for e in request if isinstance(e, Token)) + stream.finish()
        assert text == expected
    assert engine.load == (0, 0)


def test_closing_the_stream_cancels_within_one_step(backend):
    engine = backend.engine

    async def consume_a_little():
        stream = backend.stream_chat(user("go"), SamplingParams(max_new_tokens=4000))
        async for event in stream:
            if isinstance(event, TextDelta):
                break
        await stream.aclose()  # what Gradio does when the client disconnects or Stop is pressed

    asyncio.run(consume_a_little())
    wait_until(lambda: engine.load == (0, 0), 10, "the closed stream's request to leave the engine")
    assert engine._cache is None, "the KV cache of a finished batch must be freed"


def test_queue_positions_and_queue_full_message(loaded):
    engine = Engine(loaded.model, max_batch_size=1, max_queue=2)
    backend = LocalBackend(engine, loaded.chat_format, loaded.info)
    try:
        params = SamplingParams(max_new_tokens=300, seed=0)
        ids = backend.prepare(user("hi"), params)[0]
        running = engine.submit(ids, params, [])
        next(iter(running))  # first token: it holds the only slot
        waiting = [engine.submit(ids, params, []) for _ in range(2)]
        with pytest.raises(EngineBusy, match="busy") as info:
            engine.submit(ids, params, [])
        assert isinstance(info.value, BackendBusy)
        first_events = [next(iter(w)) for w in waiting]
        assert first_events == [QueuePosition(1), QueuePosition(2)]
        for request in [running, *waiting]:
            request.cancel()
        for request in waiting:
            assert list(request)[-1] == Done(FinishReason.CANCELLED)
    finally:
        engine.shutdown()


def test_no_request_is_lost_under_16_concurrent_submits(loaded):
    engine = Engine(loaded.model, max_batch_size=4, max_queue=16)
    backend = LocalBackend(engine, loaded.chat_format, loaded.info)
    spy = StepSpy(engine)

    async def all_of_them():
        return await asyncio.gather(*[
            collect(backend, user(f"request {i}"), SamplingParams(seed=i, max_new_tokens=10 + i)) for i in range(16)])

    try:
        results = asyncio.run(all_of_them())
    finally:
        engine.shutdown()
    assert [done.completion_tokens for _, done, _ in results] == [10 + i for i in range(16)]
    assert all(done.reason == "length" for _, done, _ in results)
    assert any(queued for _, _, queued in results), "with 4 slots some of 16 requests must have waited"
    assert max(spy.decode_batches) == 4, "never more than 4 at once, and the 4 slots were used"


def test_stop_tokens_end_the_reply_and_are_not_shown(tmp_path, tokenizer_model):
    from synthetic_checkpoints import write_checkpoint

    folder = write_checkpoint(tmp_path / "stopper", tokenizer_model=tokenizer_model,
                              token_bias={"<|observation|>": 30.0})
    loaded = load_from_folder(folder, Settings(precision="fp32", device="cpu"), "stopper")
    engine = Engine(loaded.model)
    backend = LocalBackend(engine, loaded.chat_format, loaded.info)
    try:
        text, done, _ = asyncio.run(collect(backend, user("hi"), SamplingParams(max_new_tokens=50)))
    finally:
        engine.shutdown()
    assert (text, done.reason, done.completion_tokens) == ("", "stop", 0)


def test_bad_input_is_rejected_before_generation(backend):
    bad = [
        ([], SamplingParams()),
        ([{"role": "wizard", "content": "x"}], SamplingParams()),
        ([{"role": "assistant", "content": "x"}], SamplingParams()),
        (user("x"), SamplingParams(max_new_tokens=backend.max_new_tokens + 1)),
    ]
    for messages, params in bad:
        with pytest.raises(InvalidRequest):
            asyncio.run(collect(backend, messages, params))
    assert backend.engine.load == (0, 0)


@pytest.mark.parametrize("values, named", [
    ({"temperature": -1}, "temperature"), ({"temperature": 2.5}, "temperature"),
    ({"top_p": float("nan")}, "top_p"), ({"top_p": 0.0}, "top_p"), ({"top_k": -1}, "top_k"),
    ({"max_new_tokens": 0}, "max_new_tokens"), ({"max_new_tokens": 10**9}, "max_new_tokens"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"), ({"temperature": "0.5"}, "temperature"),
    ({"repetition_penalty": float("inf")}, "repetition_penalty"), ({"seed": -2}, "seed"),
    ({"seed": 2**70}, "seed"), ({"temperature": True}, "temperature"), ({"colour": 1}, "colour"),
])
def test_sampling_params_reject_bad_values_by_name(values, named):
    with pytest.raises(InvalidRequest, match=named):
        SamplingParams(**values)


def test_sampling_option_ranges_are_declared_once():
    from chatglm_web.generation import option

    temperature = option("temperature")
    assert (temperature.default, temperature.minimum, temperature.maximum) == (0.8, 0.0, 2.0)
    SamplingParams(temperature=temperature.maximum)
    with pytest.raises(InvalidRequest):
        SamplingParams(temperature=temperature.maximum + 0.01)
    schema = SamplingParams.model_json_schema()["properties"]["temperature"]
    assert (schema["minimum"], schema["maximum"]) == (0.0, 2.0)


class OneTokenPerMessage:
    """A chat format whose prompt is one token per message, to check the fitting rule by hand."""

    fixed_tokens = 0

    def __init__(self):
        self.measured = []

    def message_tokens(self, message):
        self.measured.append(message["content"])
        return 1

    def prompt_ids(self, messages):
        return [m["content"] for m in messages]


def test_fit_to_context_drops_oldest_exchanges_and_keeps_system():
    messages = [{"role": "system", "content": "S"}]
    for i in range(4):
        messages += [{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"a{i}"}]
    messages.append({"role": "user", "content": "last"})

    ids, dropped = fit_to_context(messages, OneTokenPerMessage(), budget=6)
    assert ids == ["S", "u2", "a2", "u3", "a3", "last"] and dropped == 4
    ids, dropped = fit_to_context(messages, OneTokenPerMessage(), budget=5)  # never starts with a reply
    assert ids == ["S", "u3", "a3", "last"] and dropped == 6
    with pytest.raises(InvalidRequest, match="too long"):
        fit_to_context(messages, OneTokenPerMessage(), budget=1)


def test_fit_to_context_measures_each_message_once_and_stops_at_the_budget():
    messages = [{"role": "system", "content": "S"}]
    for i in range(1000):
        messages += [{"role": "user", "content": f"u{i}"}, {"role": "assistant", "content": f"a{i}"}]
    messages.append({"role": "user", "content": "last"})
    chat_format = OneTokenPerMessage()
    ids, dropped = fit_to_context(messages, chat_format, budget=10)
    assert len(ids) <= 10 and ids[0] == "S" and ids[-1] == "last"
    assert len(chat_format.measured) <= 11, "older messages beyond the budget must not be tokenized"
    assert len(set(chat_format.measured)) == len(chat_format.measured), "a message was tokenized twice"


def test_memory_is_flat_across_turns(backend):
    """Nothing accumulates per turn: after each reply the engine holds no cache or rows."""
    history = []
    for turn in range(4):
        history.append({"role": "user", "content": f"turn {turn}"})
        text, done, _ = asyncio.run(collect(backend, history, SamplingParams(seed=turn, max_new_tokens=20)))
        history.append({"role": "assistant", "content": text})
        assert backend.engine._cache is None and backend.engine._rows == []
    assert torch.is_grad_enabled()  # inference mode did not leak into the caller


def test_limits_count_a_request_about_to_be_admitted_as_running(loaded):
    """batch 1 / queue 1 on an idle engine: two quick submits are accepted, the third is refused."""
    engine = Engine(loaded.model, max_batch_size=1, max_queue=1)
    params = SamplingParams(max_new_tokens=200, seed=0)
    ids = [5, 6, 7]
    try:
        accepted = [engine.submit(ids, params, []) for _ in range(2)]
        with pytest.raises(EngineBusy) as info:
            engine.submit(ids, params, [])
        assert "1 replies are being written and 1 are waiting" in str(info.value)
        for request in accepted:
            request.cancel()
        assert [list(r)[-1].reason for r in accepted] == ["cancelled", "cancelled"]
    finally:
        engine.shutdown()


@pytest.mark.parametrize("batch, queue", [(2, 4), (1, 0), (3, 1)])
def test_exactly_batch_plus_queue_requests_are_accepted(loaded, batch, queue):
    engine = Engine(loaded.model, max_batch_size=batch, max_queue=queue)
    params = SamplingParams(max_new_tokens=500, seed=0)
    accepted, refused = [], 0
    try:
        for _ in range(batch + queue + 5):
            try:
                accepted.append(engine.submit([5, 6, 7], params, []))
            except EngineBusy:
                refused += 1
        assert (len(accepted), refused) == (batch + queue, 5)
        assert engine.load == (batch, queue)
    finally:
        for request in accepted:
            request.cancel()
        engine.shutdown()


def test_queue_position_is_sent_only_when_it_changes(loaded):
    engine = Engine(loaded.model, max_batch_size=1, max_queue=2)
    spy = StepSpy(engine)
    params = SamplingParams(max_new_tokens=60, seed=0)
    try:
        running = engine.submit([5, 6, 7], params, [])
        next(iter(running))
        waiting = [engine.submit([5, 6, 7], params, []) for _ in range(2)]
        events = [list(request) for request in waiting]
        list(running)
    finally:
        engine.shutdown()
    queued = [[e.position for e in request if isinstance(e, QueuePosition)] for request in events]
    assert queued == [[1], [2, 1]], "one event per position, not one per decode step"
    assert spy.steps >= 100, "the waiting requests waited through many decode steps"


def test_a_failing_prefill_fails_only_its_own_request(loaded, monkeypatch):
    """E.g. out of memory on one long prompt: that request gets the error, the running replies go on."""
    model = loaded.model
    engine = Engine(model, max_batch_size=4, max_queue=4)
    real_prefill = engine.step.prefill_chunk

    def prefill_chunk(ids, cache, start):
        if len(ids) > 50:  # the long prompt's prefill
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_prefill(ids, cache, start)

    params = [SamplingParams(seed=s, max_new_tokens=40) for s in range(2)]
    solo = []
    for p in params:
        solo.append([e.id for e in engine.submit([5, 6, 7, 8], p, []) if isinstance(e, Token)])
    monkeypatch.setattr(engine.step, "prefill_chunk", prefill_chunk)
    try:
        running = [engine.submit([5, 6, 7, 8], p, []) for p in params]
        first = [next(iter(r)) for r in running]
        failing = engine.submit(list(range(5, 100)), SamplingParams(seed=9, max_new_tokens=40), [])
        failed = list(failing)
        rest = [[e.id for e in r if isinstance(e, Token)] for r in running]
    finally:
        engine.shutdown()
    assert isinstance(failed[-1], Done) and failed[-1].reason == "error"
    assert "out of memory" in failed[-1].error
    for f, r, expected in zip(first, rest, solo):
        assert [f.id] + r == expected, "a running reply was disturbed by another request's failed prefill"
    assert [r.done.reason for r in running] == ["length", "length"]


def tokens_of(request) -> list[int]:
    return [e.id for e in request if isinstance(e, Token)]


def test_chunked_prefill_gives_the_same_reply_as_one_prefill(loaded):
    prompt = list(range(5, 90))
    replies = {}
    for chunk in (7, 10_000):
        engine = Engine(loaded.model, prefill_chunk=chunk)
        try:
            replies[chunk] = [tokens_of(engine.submit(prompt, SamplingParams(temperature=t, seed=3, max_new_tokens=25),
                                                      [])) for t in (0.0, 0.9)]
        finally:
            engine.shutdown()
    assert replies[7] == replies[10_000]
    assert all(len(reply) == 25 for reply in replies[7])


def test_a_long_prompt_is_prefilled_between_decode_steps_of_running_replies(loaded):
    """A 200-token prompt in chunks of 8 tokens: the running reply advances after every chunk."""
    engine = Engine(loaded.model, prefill_chunk=8)
    try:
        running = engine.submit([5, 6, 7], SamplingParams(seed=1, max_new_tokens=2000), [])
        events = iter(running)
        next(events)
        spy = StepSpy(engine)
        long = engine.submit(list(range(5, 205)), SamplingParams(seed=2, max_new_tokens=5), [])
        first = next(iter(long))
        steps_during = spy.steps
        assert isinstance(first, Token)
        assert steps_during >= 200 // 8 - 1, f"only {steps_during} decode steps ran during the 25-chunk prefill"
        assert len(tokens_of(long)) == 4  # the rest of its 5 tokens
        running.cancel()
        assert list(events)[-1] == Done(FinishReason.CANCELLED)
    finally:
        engine.shutdown()


def test_cancel_during_a_chunked_prefill_frees_the_slot(loaded):
    engine = Engine(loaded.model, max_batch_size=1, max_queue=0, prefill_chunk=4)
    try:
        request = engine.submit(list(range(5, 300)), SamplingParams(seed=0, max_new_tokens=5), [])
        request.cancel()
        assert list(request)[-1] == Done(FinishReason.CANCELLED)
        assert engine.load == (0, 0)
        after = engine.submit([5, 6, 7], SamplingParams(seed=0, max_new_tokens=5), [])
        assert len(tokens_of(after)) == 5
    finally:
        engine.shutdown()


def test_shutdown_ends_a_request_in_the_middle_of_its_prefill(loaded):
    engine = Engine(loaded.model, prefill_chunk=1)
    request = engine.submit(list(range(5, 400)), SamplingParams(seed=0, max_new_tokens=5), [])
    while not engine._prefills:
        threading.Event().wait(0.001)
    engine.shutdown()
    last = list(request)[-1]
    assert isinstance(last, Done) and last.reason == "error" and "stopped" in last.error


def test_prompts_admitted_together_share_one_prefill_and_reply_as_alone(loaded):
    prompts = [list(range(5, 30)), [7, 8, 9], list(range(40, 90))]
    params = [SamplingParams(temperature=t, seed=s, max_new_tokens=30) for t, s in [(0.0, 1), (0.9, 2), (1.2, 3)]]
    engine = Engine(loaded.model)
    spy = StepSpy(engine)
    try:
        alone = [tokens_of(engine.submit(p, s, [])) for p, s in zip(prompts, params)]
        assert spy.prefills == 3
        with engine._wake:  # the worker sees all three at once
            together = [engine.submit(p, s, []) for p, s in zip(prompts, params)]
        replies = [tokens_of(request) for request in together]
    finally:
        engine.shutdown()
    assert spy.prefills == 4, "the three prompts were not prefilled in one forward"
    assert replies == alone
