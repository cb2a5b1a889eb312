"""ZeroGPU mode (``--zero-gpu``) on the CPU, with the real ``spaces`` package.

Off ZeroGPU hardware ``spaces.GPU`` returns the function unchanged, so here the decorated
``generate_on_gpu`` runs in this process: every reply must be generated inside it (one call per
reply, with the duration computed from the request's max_new_tokens and arguments ZeroGPU can
pickle), stream token by token, stop at the next token after Stop, and equal the batching
engine's reply for a seed. The page keeps its queue positions and Stop.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import os
import pickle
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import parse_qs, urlparse

import gradio as gr
import httpx
import pytest
import spaces
from gradio.context import LocalContext
from gradio_client import Client

from chatglm_web.engine import zero_gpu
from chatglm_web.engine.admission import AdmissionPolicy, EngineBusy
from chatglm_web.engine.events import Done, QueuePosition, Token
from chatglm_web.engine.scheduler import Engine
from chatglm_web.generation import FinishReason
from chatglm_web.generation import SamplingParams, TextDelta
from chatglm_web.families.loading import load_from_folder
from chatglm_web.backends.local import LocalBackend
from chatglm_web.settings import Settings
from chatglm_web.engine.zero_gpu import GPU_MAX_SECONDS, StopOnCancel, ZeroGPUEngine, gpu_seconds
from chat_helpers import collect, user
from server_harness import app_process, free_port, running_server
from server_harness import chat_args as http_chat_args
from waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]

TIMEOUT = 120


@pytest.fixture(scope="module")
def loaded(long_reply_checkpoint):
    """The tiny model loaded as ZeroGPU mode loads it (here: on the CPU)."""
    return load_from_folder(long_reply_checkpoint, Settings(precision="fp32", device="cpu", zero_gpu=True), "tiny")


@pytest.fixture
def backends(loaded):
    """(ZeroGPU backend, batching-engine backend) on the same weights."""
    zero = ZeroGPUEngine(loaded.model, max_batch_size=4, max_queue=4)
    engine = Engine(loaded.model, max_batch_size=4, max_queue=4)
    yield LocalBackend(zero, loaded.chat_format, loaded.info), LocalBackend(engine, loaded.chat_format, loaded.info)
    zero.shutdown()
    engine.shutdown()


@dataclass
class GpuCall:
    """One call of the decorated function, as ZeroGPU would see it."""

    args: tuple
    duration: int  # what spaces computes: the duration callable applied to the call's arguments
    thread: str
    visitor_token: str | None  # the X-IP-Token of the Gradio request in the call's context (the visitor's quota)
    tokens: list = field(default_factory=list)  # every id the GPU function yielded
    ended: threading.Event = field(default_factory=threading.Event)  # the generator finished or was closed

    @property
    def params(self) -> SamplingParams:
        return self.args[2]


class GpuCalls(list):
    """The ``GpuCall``s so far; ``after_token(call)``, when set, runs in the GPU function's thread each time it has
    produced a token (before yielding it): a test acts at an exact token there instead of racing the thread."""

    after_token = None


@pytest.fixture
def gpu_calls(monkeypatch):
    """Spy on ``zero_gpu.generate_on_gpu``: record each call and run it as a ZeroGPU worker would.

    The function gets its arguments pickled and unpickled, as the worker does; so, as there, its
    stopping criterion never fires and only closing the call (Stop) can end it early.
    """
    calls = GpuCalls()
    decorated = zero_gpu.generate_on_gpu
    problems: list[str] = []  # what the spy found wrong: it runs in the engine's threads, where an assert is lost

    def check(ok: bool, problem: str) -> None:
        if not ok:
            problems.append(problem)

    def spy(*args, **kwargs):
        # ZeroGPU pickles the arguments to the forked worker and each yielded item back
        sent_args, sent_kwargs = pickle.loads(pickle.dumps((args, kwargs)))
        check(sent_args[:6] == args[:6] and not kwargs, f"the arguments changed in pickling: {args} {kwargs}")
        check(isinstance(sent_args[6], StopOnCancel) and not sent_args[6](), "a worker gets a fresh criterion")
        request = LocalContext.request.get(None)
        call = GpuCall(args, gpu_seconds(*args, **kwargs), threading.current_thread().name,
                       request.headers.get("x-ip-token") if request is not None else None)
        calls.append(call)

        def tokens():
            inner = decorated(*sent_args, **sent_kwargs)
            try:
                for token in inner:
                    check(type(token) is int, f"the GPU function yielded {token!r}, not a token id")
                    call.tokens.append(token)
                    if calls.after_token is not None:
                        calls.after_token(call)
                    yield token
            finally:
                inner.close()
                call.ended.set()

        return tokens()

    monkeypatch.setattr(zero_gpu, "generate_on_gpu", spy)
    yield calls
    assert not problems, problems   # in the test's thread


def next_event(request):
    """The request's next event (the queue its sync iterator reads), failing instead of hanging."""
    return request._queue.get(timeout=TIMEOUT)


def rest(request) -> list:
    """The request's remaining events, up to and including ``done``."""
    events = [next_event(request)]
    while not isinstance(events[-1], Done):
        events.append(next_event(request))
    return events


def tokens_of(request) -> tuple[list[int], Done]:
    events = rest(request)
    return [e.id for e in events if isinstance(e, Token)], events[-1]


# -- the decorated function --------------------------------------------------------------------------------------

def test_off_zerogpu_the_decorator_passes_the_generator_through():
    assert not spaces.config.Config.zero_gpu
    assert inspect.isgeneratorfunction(zero_gpu.generate_on_gpu), "spaces streams only a generator function"


def test_the_duration_follows_max_new_tokens_and_is_capped():
    def seconds(max_new_tokens, prompt=10, context=8192):
        return gpu_seconds(1, list(range(prompt)), SamplingParams(max_new_tokens=max_new_tokens), (2,), context, 0,
                           StopOnCancel())

    assert seconds(1) == zero_gpu.GPU_START_SECONDS + 1
    assert seconds(100) == 15 and seconds(1000) == 60
    assert seconds(1000) > seconds(500) > seconds(100)
    assert seconds(32768) == GPU_MAX_SECONDS
    assert seconds(1000, prompt=8000) == 20  # the reply cannot be longer than the context leaves


@pytest.mark.parametrize("params", [
    SamplingParams(seed=1, max_new_tokens=30),
    SamplingParams(seed=2, max_new_tokens=25, temperature=1.3, top_p=1.0),
    SamplingParams(seed=3, max_new_tokens=20, temperature=0.0),
    SamplingParams(seed=4, max_new_tokens=40, top_k=20, top_p=0.5, repetition_penalty=1.3),
], ids=["default", "hot", "greedy", "top-k-penalty"])
def test_each_reply_is_one_gpu_call_and_equals_the_engines_for_a_seed(backends, gpu_calls, params):
    zero, engine = backends
    messages = user("Tell me something")
    expected_text, expected = asyncio.run(collect(engine, messages, params))
    text, done = asyncio.run(collect(zero, messages, params))
    assert (text, done.completion_tokens, done.reason) == (expected_text, expected.completion_tokens, "length")
    assert len(gpu_calls) == 1, "the reply was not generated inside the decorated function"
    call = gpu_calls[0]
    assert call.params == params and len(call.tokens) == params.max_new_tokens
    assert call.duration == gpu_seconds(*call.args) == zero_gpu.GPU_START_SECONDS + -(-params.max_new_tokens // 20)
    assert call.thread.startswith("chatglm-web-zerogpu-")


def test_a_stop_token_ends_the_reply_unseen_as_in_the_engine(backends, gpu_calls):
    zero, engine = backends
    ids = zero.prepare(user("hi"), SamplingParams(max_new_tokens=30))[0]
    params = SamplingParams(seed=5, max_new_tokens=30)
    reply, _ = tokens_of(engine.engine.submit(ids, params))
    stop = reply[6]  # a token the reply produces: as a stop id it ends the reply there
    cut = reply.index(stop)
    assert tokens_of(engine.engine.submit(ids, params, {stop})) == (reply[:cut], Done(FinishReason.STOP))
    assert tokens_of(zero.engine.submit(ids, params, {stop})) == (reply[:cut], Done(FinishReason.STOP))
    assert gpu_calls[-1].tokens == reply[:cut + 1], "the GPU call went on after the stop token"


# -- Stop -------------------------------------------------------------------------------------------------------

def test_the_stopping_criterion_ends_the_gpu_function_before_its_next_forward_pass(loaded):
    """In-process (off ZeroGPU) the cancel event itself stops the decorated function."""
    zero = ZeroGPUEngine(loaded.model)  # makes the model known to the GPU function
    forward_passes = []
    step = zero_gpu._step_of(zero._key)  # the step the GPU function runs: the engine's lean forward
    assert step.lean is not None
    hook = step.lean.register_forward_hook(lambda *_: forward_passes.append(1))
    try:
        cancel = threading.Event()
        tokens = zero_gpu.generate_on_gpu(zero._key, [5, 6, 7], SamplingParams(max_new_tokens=100), (), 8192, 0,
                                          StopOnCancel(cancel))
        first = [next(tokens) for _ in range(3)]
        cancel.set()
        assert list(tokens) == [] and len(first) == len(forward_passes) == 3
    finally:
        hook.remove()
        zero.shutdown()


def test_stop_ends_the_gpu_call_at_the_next_token(backends, gpu_calls):
    zero, _ = backends
    params = SamplingParams(max_new_tokens=4000)
    submitted, box = threading.Event(), {}

    def stop_at_the_fifth(call):   # Stop pressed exactly when the GPU function has produced its 5th token
        if len(call.tokens) == 5:
            submitted.wait(TIMEOUT)   # (an assert here, in the GPU thread, would be lost)
            box["request"].cancel()

    gpu_calls.after_token = stop_at_the_fifth
    box["request"] = request = zero.engine.submit(zero.prepare(user("go on"), params)[0], params)
    submitted.set()
    events = rest(request)
    assert events[-1] == Done(FinishReason.CANCELLED) and request.done == Done(FinishReason.CANCELLED)
    assert all(isinstance(event, Token) for event in events[:-1]) and len(events) <= 6
    assert gpu_calls[0].ended.wait(TIMEOUT)
    assert 5 <= len(gpu_calls[0].tokens) <= 6, "the GPU function went on after Stop"
    wait_until(lambda: zero.engine.load == (0, 0), TIMEOUT, "the slot to be free")


def test_closing_the_stream_closes_the_gpu_call(backends, gpu_calls):
    """What Gradio does on Stop or a disconnect: close the backend's stream."""
    zero, _ = backends

    async def read_a_little():
        stream = zero.stream_chat(user("go on"), SamplingParams(max_new_tokens=4000))
        async for event in stream:
            if isinstance(event, TextDelta):
                break
        await stream.aclose()

    asyncio.run(read_a_little())
    assert gpu_calls[0].ended.wait(TIMEOUT)
    assert len(gpu_calls[0].tokens) < 4000


# -- admission ----------------------------------------------------------------------------------------------------

def test_queue_positions_busy_message_and_leaving_the_queue(loaded, gpu_calls):
    zero = ZeroGPUEngine(loaded.model, max_batch_size=1, max_queue=2)
    try:
        params = SamplingParams(max_new_tokens=4000, seed=0)
        ids = LocalBackend(zero, loaded.chat_format, loaded.info).prepare(user("hi"), params)[0]
        running = zero.submit(ids, params)
        assert isinstance(next_event(running), Token)  # it holds the only GPU slot
        waiting = [zero.submit(ids, params) for _ in range(2)]
        assert [next_event(w) for w in waiting] == [QueuePosition(1), QueuePosition(2)]
        assert zero.load == (1, 2)
        with pytest.raises(EngineBusy) as busy:
            zero.submit(ids, params)
        with pytest.raises(EngineBusy) as engine_busy:  # the batching engine's words for the same state
            AdmissionPolicy(max_running=1, max_waiting=2).check(1, 2)
        assert str(busy.value) == str(engine_busy.value)
        waiting[0].cancel()  # Stop while waiting: the place is freed at once, the one behind moves up
        assert rest(waiting[0]) == [Done(FinishReason.CANCELLED)]
        assert next_event(waiting[1]) == QueuePosition(1)
        assert zero.load == (1, 1)
        running.cancel()
        assert isinstance(next_event(waiting[1]), Token), "the freed slot went to the waiting request"
        waiting[1].cancel()
        assert rest(waiting[1])[-1] == Done(FinishReason.CANCELLED)
        assert len(gpu_calls) == 2, "a request that left the queue must not cost a GPU call"
    finally:
        zero.shutdown()


def test_a_failed_gpu_call_ends_only_its_request_with_zerogpus_message(backends, monkeypatch):
    zero, _ = backends
    working = zero_gpu.generate_on_gpu

    def refused(*args, **kwargs):  # what spaces raises when the visitor's quota is spent
        raise gr.Error("You have exceeded your free GPU quota (60s requested vs. 12s left).")
        yield

    monkeypatch.setattr(zero_gpu, "generate_on_gpu", refused)
    text, done = asyncio.run(collect(zero, user("hi"), SamplingParams(max_new_tokens=5)))
    assert (text, done.reason) == ("", "error")
    assert done.error == "You have exceeded your free GPU quota (60s requested vs. 12s left)."
    monkeypatch.setattr(zero_gpu, "generate_on_gpu", working)
    assert asyncio.run(collect(zero, user("hi"), SamplingParams(max_new_tokens=5)))[1].reason == "length"
    assert zero.engine.alive and zero.engine.load == (0, 0)


# -- the page ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def page(long_reply_checkpoint):
    """The real app in ZeroGPU mode with one GPU slot, so that a second request waits for it."""
    with running_server(model=str(long_reply_checkpoint), zero_gpu=True, max_batch_size=1,
                        max_new_tokens=4096) as server:
        yield server


chat_args = partial(http_chat_args, max_new_tokens=8)  # the /chat endpoint's inputs, short replies


def test_the_page_runs_each_reply_in_a_gpu_call_with_the_visitors_quota(page, gpu_calls, backends):
    assert isinstance(page.engine, ZeroGPUEngine)
    header = [c for c in httpx.get(page.url + "config", timeout=TIMEOUT).json()["components"]
              if c["props"].get("elem_id") == "model-title"]
    assert "fp32 · cpu · " in header[0]["props"]["value"] and "ZeroGPU mode" in header[0]["props"]["value"]
    client = Client(page.url, verbose=False, headers={"X-IP-Token": "visitor-token"})
    reply, stats = client.predict(*chat_args("Hello", max_new_tokens=12, seed=9), api_name="/chat")
    assert "reply 12 tokens" in stats
    assert len(gpu_calls) == 1 and gpu_calls[0].params.max_new_tokens == 12
    assert gpu_calls[0].duration == zero_gpu.GPU_START_SECONDS + 1
    assert gpu_calls[0].visitor_token == "visitor-token", "spaces would not see the visitor (quota) in the call"
    _, engine = backends
    expected, _ = asyncio.run(collect(engine, user("Hello"), SamplingParams(max_new_tokens=12, seed=9)))
    assert reply == expected


def test_the_page_shows_queue_positions_and_stop_ends_the_gpu_call(page, gpu_calls):
    busy = Client(page.url, verbose=False).submit(*chat_args("Keep the slot busy", max_new_tokens=4000),
                                                  api_name="/chat")
    wait_until(lambda: page.engine.load == (1, 0), TIMEOUT, "the first request to take the only GPU slot")
    waiting = Client(page.url, verbose=False).submit(*chat_args("I will wait"), api_name="/chat")
    wait_until(lambda: any("position 1 in the queue" in str(out) for out in waiting.outputs()), TIMEOUT,
               "the queue position")
    assert len(gpu_calls) == 1, "a waiting request must not hold a GPU call"
    busy.cancel()  # Stop
    assert gpu_calls[0].ended.wait(TIMEOUT), "Stop did not end the GPU call"
    assert len(gpu_calls[0].tokens) < 4000
    reply, stats = waiting.result(timeout=TIMEOUT)
    assert "reply 8 tokens" in stats and len(gpu_calls) == 2


# -- the real spaces ZeroGPU machinery, the CPU standing in for the GPU ------------------------------------------------

#: Starts app.py with spaces in ZeroGPU mode (SPACES_ZERO_GPU=true) on a machine without CUDA. spaces' torch patching
#: (CUDA reported as an H200, ``.to("cuda")`` recorded instead of done), its scheduling client, forked worker, result
#: queues, stop event and release all run for real. Only what needs CUDA is stood in for: spaces reads three things
#: of a CUDA build of torch; at launch the weights are not packed to disk, and in the worker, instead of starting CUDA
#: and copying them there, each tensor the app moved "to the GPU" gets its CPU data back.
ZERO_GPU_ON_CPU = """
import runpy, sys, torch
if torch.version.cuda is None:
    torch.version.cuda = "13.0"
    torch._C._cuda_init = lambda: None
    def not_in_bad_fork():
        return False
    torch.cuda._is_in_bad_fork = not_in_bad_fork
import spaces.zero.torch as zero_torch
from spaces.zero.torch import patching

def move(callback=None):
    for fake, original in patching.cuda_aliases.items():
        fake.data = original

zero_torch.init, zero_torch.pack, zero_torch.move = (lambda nvidia_uuid: None), (lambda: 0), move
sys.argv = ["app.py", *sys.argv[1:]]
runpy.run_path("app.py", run_name="__main__")
"""


class FakeDeviceAPI:
    """ZeroGPU's device API as spaces calls it: every GPU asked for is granted; each call is recorded."""

    def __init__(self):
        self.calls: list[tuple[float, str, dict]] = []
        self.released = threading.Condition()
        api = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                url = urlparse(self.path)
                query = {key: values[0] for key, values in parse_qs(url.query).items()}
                with api.released:
                    api.calls.append((time.monotonic(), url.path, query))
                    granted = sum(path == "/schedule" for _, path, _ in api.calls)
                    api.released.notify_all()
                body = b"{}"
                if url.path == "/schedule":
                    body = json.dumps({"idle": granted > 1, "nvidiaIndex": 0, "nvidiaUUID": "GPU-emulated",
                                       "allowToken": f"allow-{granted}"}).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def requests(self, path: str) -> list[dict]:
        return [query for _, name, query in self.calls if name == path]

    def wait_for_release(self, count: int, timeout: float) -> float | None:
        """When the ``count``-th GPU was released (monotonic time), or None."""
        with self.released:
            self.released.wait_for(lambda: len(self.requests("/release")) >= count, timeout)
            times = [at for at, name, _ in self.calls if name == "/release"]
        return times[count - 1] if len(times) >= count else None


@pytest.fixture(scope="module")
def zero_gpu_space(long_reply_checkpoint, tmp_path_factory):
    """app.py as a ZeroGPU Space starts it (SPACES_ZERO_GPU=true, the Space's host and port), against FakeDeviceAPI."""
    api, home, port = FakeDeviceAPI(), tmp_path_factory.mktemp("zerogpu-home"), free_port()
    (home / "cgroup").write_text("0::/emulated\n")
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("CHATGLM_WEB_", "GRADIO_SERVER_"))},
           "SPACES_ZERO_GPU": "true", "SPACES_ZERO_DEVICE_API_URL": api.url, "SPACE_ID": "someone/chatglm3",
           "ZEROGPU_PROC_SELF_CGROUP_PATH": str(home / "cgroup"), "HOME": str(home), "HF_HUB_OFFLINE": "1",
           "GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": str(port), "PYTHONUNBUFFERED": "1"}
    with app_process(["-c", ZERO_GPU_ON_CPU, "--model", str(long_reply_checkpoint), "--max-new-tokens", "8000"],
                     cwd=ROOT, env=env) as app:
        yield SimpleNamespace(api=api, app=app, url=f"http://127.0.0.1:{port}/")


def test_on_zerogpu_the_model_loads_as_zerogpu_requires_and_the_header_shows_the_hardware(zero_gpu_space):
    config = httpx.get(zero_gpu_space.url + "config", timeout=TIMEOUT).json()
    header = [c["props"]["value"] for c in config["components"] if c["props"].get("elem_id") == "model-title"][0]
    # precision from the hardware spaces describes (an H200 slice), weights moved "to the GPU" at start-up
    assert "bf16 · ZeroGPU · NVIDIA H200" in header   # the top bar: precision · device
    assert zero_gpu_space.api.requests("/startup-report"), "spaces did not report the decorated function at launch"


def test_on_zerogpu_each_reply_runs_in_spaces_forked_worker_with_its_duration(zero_gpu_space, long_reply_checkpoint):
    api = zero_gpu_space.api
    client = Client(zero_gpu_space.url, verbose=False, headers={"X-IP-Token": "visitor-token"})
    reply, stats = client.predict(*chat_args("Hello", max_new_tokens=12, seed=9), api_name="/chat")
    bf16 = load_from_folder(long_reply_checkpoint, Settings(precision="bf16", device="cpu"), "tiny")
    engine = Engine(bf16.model)
    try:
        expected, _ = asyncio.run(collect(LocalBackend(engine, bf16.chat_format, bf16.info), user("Hello"),
                                          SamplingParams(max_new_tokens=12, seed=9)))
    finally:
        engine.shutdown()
    assert reply == expected, "the worker's reply is not the engine's (same bf16 weights, same seed)"
    schedule, = api.requests("/schedule")
    assert schedule["durationSeconds"] == str(zero_gpu.GPU_START_SECONDS + 1)  # 12 tokens
    assert schedule["token"] == "visitor-token", "the GPU was not asked for with the visitor's quota"
    allow, = api.requests("/allow")
    assert int(allow["pid"]) != zero_gpu_space.app.pid, "the reply was not generated in a forked worker"
    assert api.wait_for_release(1, TIMEOUT) and "reply 12 tokens" in stats


def test_on_zerogpu_stop_ends_the_workers_call_at_once(zero_gpu_space):
    api = zero_gpu_space.api
    released = len(api.requests("/release"))
    job = Client(zero_gpu_space.url, verbose=False).submit(*chat_args("Go on", max_new_tokens=8000), api_name="/chat")
    wait_until(lambda: len(job.outputs()) >= 3, TIMEOUT, "the reply to stream")
    assert len(api.requests("/schedule")) == released + 1
    stopped = time.monotonic()
    job.cancel()  # Stop
    ended = api.wait_for_release(released + 1, TIMEOUT)
    assert ended is not None, "the GPU was never released"
    # 8000 tokens take this CPU over 30 s: a call that was not stopped would be released only then
    assert ended - stopped < 10, f"the GPU was released {ended - stopped:.1f} s after Stop"
    reply, stats = Client(zero_gpu_space.url, verbose=False).predict(*chat_args("Hello again"), api_name="/chat")
    assert "reply 8 tokens" in stats, "the next reply after Stop failed"
