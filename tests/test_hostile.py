"""Hostile and careless clients against the real server (issue 9, "Dependable in front of an audience").

Everything goes through the public surface a stranger on the network has: Gradio's HTTP API
(``/gradio_api/call/chat`` streamed with plain httpx, the page's own event handlers by index
as the browser calls them, ``/gradio_api/upload``). For every attack the test checks:

* a clear message: the refusal says what is wrong (key words only, e.g. "too long" and the
  limit, "busy", the name of the sampling option), never ``{"error": null}``;
* the server is still alive afterwards (the page loads, a new short conversation finishes);
* a normal conversation running at the same time finishes exactly: a seeded request (fixed
  seed, temperature > 0) is first run alone for its reply, then again while the attack runs,
  and both replies must be identical, token for token;
* disk writes stay under a bound: bytes in Gradio's cache (``GRADIO_TEMP_DIR``, a fresh folder
  for this server) and in the app's download folder (files of this test only) before and after.

The server: the tiny generated ChatGLM3 checkpoint whose replies always run to max_new_tokens,
``--max-batch-size 2 --max-queue 4 --max-input-chars 3000``.
"""

from __future__ import annotations

import json
import math
import re
import tempfile
import threading
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from chatglm_web.conversations.tree import from_history
from server_harness import (PageClient, chat_args, chat_over_http, dir_bytes, gradio_temp_dir, requests_ended, run_fn,
                            running_server)
from waiting import wait_until

BATCH, QUEUE = 2, 4  # --max-batch-size, --max-queue of the test server
LIMIT = 3000  # --max-input-chars of the test server
DISK_BOUND = 1 << 20  # bytes one attack may add to the server's temp and cache folders
TIMEOUT = 180  # seconds for any one HTTP exchange; generous for a busy 2-core machine
NORMAL_TOKENS = 120  # the concurrent normal conversation's reply length
MARK = f"hostile-{uuid.uuid4().hex[:12]}"  # in every conversation sent here: finds this test's files
DOWNLOADS = Path(tempfile.gettempdir()) / "chatglm-web-downloads"  # the app's download files (shared folder)


# -- fixtures ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gradio_temp(tmp_path_factory):
    """A fresh GRADIO_TEMP_DIR for this module's server (read by Gradio when the app is built)."""
    with gradio_temp_dir(tmp_path_factory.mktemp("gradio-temp")) as path:
        yield path


@pytest.fixture(scope="module")
def server(long_reply_checkpoint, gradio_temp):
    with running_server(model=str(long_reply_checkpoint), max_batch_size=BATCH, max_queue=QUEUE,
                        max_input_chars=LIMIT, max_new_tokens=4096) as srv:
        srv.temp_dir = gradio_temp
        srv.solo = {}  # reply length -> the normal conversation's result when it ran alone
        yield srv


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        yield client


# -- helpers -------------------------------------------------------------------------------------------------------

def normal_args(tokens: int) -> list:
    return chat_args(f"{MARK} Please tell me about the sea.", system="You are a test assistant.",
                     temperature=0.9, top_p=0.9, max_new_tokens=tokens, seed=4321)


def chat(server, data, **kwargs):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        return chat_over_http(client, data, **kwargs)


def reply_tokens(stats: str | None) -> int | None:
    found = re.search(r"reply (\d+) tokens", stats or "")
    return int(found.group(1)) if found else None


def disk_usage(server) -> int:
    return dir_bytes(server.temp_dir) + dir_bytes(DOWNLOADS, contains=MARK)


def solo_reply(server, tokens: int):
    """The normal conversation run alone (cached): what it must produce under attack too."""
    if tokens not in server.solo:
        wait_until(lambda: server.engine.load == (0, 0), 60, "an idle engine")
        result = chat(server, normal_args(tokens))
        assert result.event == "complete", result
        assert reply_tokens(result.stats) == tokens, result.stats
        server.solo[tokens] = result
    return server.solo[tokens]


def assert_alive(server) -> None:
    assert httpx.get(server.url, timeout=TIMEOUT).status_code == 200
    result = chat(server, chat_args(f"{MARK} still there?", max_new_tokens=5, seed=2))
    assert result.event == "complete" and reply_tokens(result.stats) == 5, result


@contextmanager
def under_attack(server, *, tokens: int = NORMAL_TOKENS):
    """Run the body while a seeded normal conversation is streaming; then check it, liveness and disk.

    Yields a dict whose "result" is set once the normal conversation has ended.
    """
    expected = solo_reply(server, tokens)
    before = disk_usage(server)
    started = threading.Event()
    box: dict = {}

    def normal():
        try:
            box["result"] = chat(server, normal_args(tokens), on_accepted=lambda _: started.set())
        except BaseException as error:  # reported below
            box["error"] = error
        finally:
            started.set()

    thread = threading.Thread(target=normal, name="normal-conversation", daemon=True)
    thread.start()
    assert started.wait(TIMEOUT), "the normal conversation did not start"
    try:
        yield box
    finally:
        thread.join(TIMEOUT)
    assert "error" not in box, f"the normal conversation failed: {box['error']!r}"
    result = box.get("result")
    assert result is not None and result.event == "complete", f"the normal conversation did not finish: {result}"
    assert reply_tokens(result.stats) == tokens, result.stats
    assert result.reply == expected.reply, "the normal conversation's reply changed under attack"
    assert_alive(server)
    grown = disk_usage(server) - before
    assert grown <= DISK_BOUND, f"the attack left {grown:,} bytes in the server's temp/cache folders"


def limit_pattern(limit: int) -> str:
    """The number ``limit`` as a message may write it: 3000, 3,000, 3 000, 3.000."""
    digits = f"{limit:,}".split(",")
    return r"\b" + r"[,.\s\u202f]?".join(digits) + r"\b"


def assert_too_long(result, limit: int = LIMIT) -> None:
    assert result.event == "error" or result.status >= 400, f"expected a refusal, got {result}"
    message = result.message
    assert "too long" in message.lower(), f"unclear message: {message!r}"
    assert re.search(limit_pattern(limit), message), f"the message does not name the limit {limit}: {message!r}"


def assert_clear_outcome(result, what: str = "") -> None:
    """A normal reply, or a refusal with a message (never an empty or null error)."""
    if result.event == "complete":
        assert isinstance(result.reply, str) and reply_tokens(result.stats) is not None, (what, result)
        return
    assert result.event == "error" or result.status >= 400, f"{what}: no answer: {result}"
    assert result.message.strip() and result.message.strip().lower() not in ("none", "null"), (
        f"{what}: an error without a message: {result}")


def assert_busy(result) -> None:
    message = result.message.lower()
    assert (result.event == "error" or result.status >= 400) and ("busy" in message or "full" in message), (
        f"expected a 'busy, try again' answer, got {result}")


def text_message(role: str, text: str) -> dict:
    """One message in the Chatbot component's wire format."""
    return {"role": role, "content": [{"type": "text", "text": text}]}


def queue_positions(result) -> list[int]:
    return [int(n) for line in result.waiting_lines for n in re.findall(r"position\D*(\d+)", line)]


# -- oversized input -----------------------------------------------------------------------------------------------

def test_a_20_mb_message_is_refused_before_it_is_read(server):
    """Over the body limit (http_guard.body_limit: 8 MiB here): 413 from its Content-Length, nothing read."""
    with under_attack(server):
        result = chat(server, chat_args(MARK + "x" * (20_000_000 - len(MARK))))
    assert result.status == 413, result
    assert "too large" in result.message and re.search(limit_pattern(8 * 2**20), result.message), result.message


def test_the_character_limit_is_exact_and_covers_the_system_prompt(server):
    words = (f"{MARK} " + "hello world " * LIMIT)
    with under_attack(server):
        two_mb = chat(server, chat_args(MARK + "x" * (2_000_000 - len(MARK))))
        over = chat(server, chat_args(words[:LIMIT + 1], max_new_tokens=4))
        at_limit = chat(server, chat_args(words[:LIMIT], max_new_tokens=4))
        long_system = chat(server, chat_args("hi", system=words[:LIMIT + 1], max_new_tokens=4))
    assert_too_long(two_mb)
    assert_too_long(over)
    assert at_limit.event == "complete" and reply_tokens(at_limit.stats) == 4, at_limit
    assert_too_long(long_system)


def test_a_420_kb_history_is_fitted_to_the_context(server, http):
    """420 kB of earlier turns (each under the limit), kept in the browser as an earlier version of the page kept
    its one conversation (the one conversation a browser sends unsealed: the page takes it into its list when it
    loads): the next turn uses the newest ones that fit, and the page says so."""
    turn = ("hello world " * 200)[:1750]
    history = []
    for i in range(120):
        history += [text_message("user", f"{MARK} {i} {turn}"), text_message("assistant", f"{i} {turn}")]
    assert len(json.dumps(history)) > 420_000
    page = PageClient(http)
    with under_attack(server):
        loaded = page.load(legacy=history)
        went = page.turn(f"{MARK} and now?", max_new_tokens=8, seed=3)
    assert loaded.ok and len(page.chat()) >= 240, "the kept conversation was not taken in"
    assert went.began.status_code == 200, went.began.text[:500]
    assert went.stream and went.stream[-1]["success"], went.stream[-1:]
    assert reply_tokens(went.stats) == 8, went.stats
    assert "left out" in went.stats and "oldest" in went.stats, went.stats
    # fit_to_context fits (it refuses only a newest message that cannot fit alone): whole exchanges are dropped,
    # oldest first, and the newest ones are kept
    dropped = int(re.search(r"the (\d+) oldest messages were left out", went.stats).group(1))
    assert 0 < dropped < 240 and dropped % 2 == 0, went.stats


# -- odd text ------------------------------------------------------------------------------------------------------

def test_an_empty_message_gets_a_clear_message(server):
    with under_attack(server):
        results = {repr(m): chat(server, chat_args(m, max_new_tokens=4)) for m in ("", "   \n\t  ")}
    for message, result in results.items():
        assert result.event == "error" and "empty" in result.message.lower(), (message, result)


ODD_TEXT = {
    "control characters": "".join(chr(c) for c in range(1, 32)) + "\x7f\x1b[2J\x1b[31mred\x1b[0m\u202e\u200b\ufeff",
    "NUL": "a\x00b" + "\x00" * 1000,
    "script": "<script>alert(document.cookie)</script>",
    "img onerror": '<img src=x onerror="alert(1)">',
    "full-page div": '<div style="position:fixed;inset:0;background:red">owned</div>',
    "svg / javascript: url": '"><svg onload=alert(1)><a href="javascript:alert(1)">x</a>',
    "template syntax": "{{7*7}} ${7*7} <%= 7*7 %> {% raw %}",
}


def test_odd_text_is_answered_and_the_conversation_goes_on(server, http):
    """Control characters, NUL and HTML/JS are text: answered (or clearly refused) as a message or a system
    prompt, and the next turn of the same conversation works."""
    results = {}
    with under_attack(server):
        for name, payload in ODD_TEXT.items():
            session = uuid.uuid4().hex
            results[name] = (
                chat_over_http(http, chat_args(f"{MARK} {payload}", max_new_tokens=4, seed=5), session_hash=session),
                chat(server, chat_args(f"{MARK} hi", system=payload, max_new_tokens=4, seed=5)),
                chat_over_http(http, chat_args(f"{MARK} next", max_new_tokens=4, seed=6), session_hash=session),
            )
    for name, (first, system, second) in results.items():
        assert_clear_outcome(first, name)
        assert_clear_outcome(system, f"{name} in the system prompt")
        assert second.event == "complete" and reply_tokens(second.stats) == 4, (name, second)


SURROGATES = {
    "lone high surrogate": ("\ud800", ""),
    "lone low surrogate": ("abc\udfff", ""),
    "high surrogate at the end": ("hello \ud83d", ""),
    "in the system prompt": ("hello", "be nice \ud800"),
}


def test_a_lone_surrogate_gets_a_clear_message(server):
    with under_attack(server):
        results = {name: chat(server, chat_args(message, system=system, max_new_tokens=4))
                   for name, (message, system) in SURROGATES.items()}
        emoji = chat(server, chat_args("\ud83d\ude00 ok", max_new_tokens=4))  # a proper pair, escaped in the JSON
    for name, result in results.items():
        assert result.event == "error" and result.error is not None, f"{name}: no clear message: {result}"
        assert re.search(r"surrogate|character|unicode|invalid|encod", result.message, re.I), (name, result.message)
    assert emoji.event == "complete" and reply_tokens(emoji.stats) == 4, emoji


# -- sampling values -----------------------------------------------------------------------------------------------

ARG_INDEX = {"temperature": 2, "top_p": 3, "max_new_tokens": 4, "top_k": 5, "repetition_penalty": 6, "seed": 7}
BAD_VALUES = {
    "temperature": [2.5, -0.5, math.nan, math.inf, "hot"],
    "top_p": [0.0, 1.5, math.nan, "most"],
    "max_new_tokens": [0, 10**9, math.nan, "many"],
    "top_k": [-1, 1000, math.nan, "k"],
    "repetition_penalty": [0.5, 2.5, math.nan, "rp"],
    "seed": [2**70, math.nan, "abc"],
}


def names_option(message: str, option: str) -> bool:
    """The message names the option, as its API name or its label (top_p, top-p, Top p ...)."""
    canonical = re.sub(r"[\s\-]+", "_", message.lower())
    return option in canonical


def test_bad_sampling_values_get_a_message_naming_the_option(server):
    """Out-of-range, NaN, infinite and string values, one option at a time: each refused, naming that option."""
    unclear = []
    with under_attack(server):
        for option, values in BAD_VALUES.items():
            for value in values:
                data = chat_args(f"{MARK} hi", max_new_tokens=4)
                data[ARG_INDEX[option]] = value
                result = chat(server, data)
                refused = result.event == "error" or result.status >= 400
                if not (refused and result.error and names_option(result.message, option)):
                    unclear.append(f"{option}={value!r}: {result.event or result.status} {result.error!r}")
    assert not unclear, "answers that do not name the bad option:\n" + "\n".join(unclear)


# -- floods --------------------------------------------------------------------------------------------------------

def flood(server, count: int, *, tokens: int = 2000):
    """``count`` simultaneous long requests; each leaves once every one has been answered (accepted or refused)."""
    answered = []
    lock = threading.Lock()
    everyone = threading.Event()
    give_up = threading.Event()  # a request never answered: everybody leaves, so the test fails instead of hanging
    start = threading.Barrier(count)

    def on_answer(_):
        with lock:
            answered.append(1)
            if len(answered) == count:
                everyone.set()

    def one(i):
        start.wait()
        return chat(server, chat_args(f"{MARK} flood {i}", max_new_tokens=tokens, seed=100 + i),
                    on_accepted=on_answer,
                    leave_when=lambda r: give_up.is_set() or (everyone.is_set() and bool(r.replies)))

    with ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(one, i) for i in range(count)]
        if not everyone.wait(TIMEOUT):
            give_up.set()
        results = [f.result(timeout=TIMEOUT) for f in futures]
    assert not give_up.is_set(), (f"{count - len(answered)} of {count} requests were neither accepted nor refused "
                                  f"within {TIMEOUT} s (waiting unseen?)")
    return results


def test_50_parallel_submits_get_exactly_the_documented_slots(server):
    """With a normal conversation running, 50 at once: exactly batch + queue - 1 more are taken, the rest are busy."""
    cancelled = requests_ended(server, "cancelled")
    with under_attack(server, tokens=1000) as normal:
        results = flood(server, 50)
        normal_was_running = "result" not in normal
    accepted = [r for r in results if r.updates and r.event != "error"]
    refused = [r for r in results if not (r.updates and r.event != "error")]
    assert normal_was_running, "the normal conversation ended before the flood was answered (machine too slow?)"
    assert len(accepted) == BATCH + QUEUE - 1, f"{len(accepted)} of 50 accepted, expected {BATCH + QUEUE - 1}"
    for result in refused:
        assert_busy(result)
    assert sum(r.waited for r in accepted) == QUEUE, "requests told to wait for a slot"
    assert all(1 <= p <= QUEUE for r in accepted for p in queue_positions(r)), [queue_positions(r) for r in accepted]
    # the accepted ones left mid-reply: each was counted as cancelled, and the engine freed its slot
    wait_until(lambda: requests_ended(server, "cancelled") >= cancelled + len(accepted), 60,
               "the flood to be cancelled")
    wait_until(lambda: server.engine.load == (0, 0), 60, "an idle engine")


def test_a_submit_about_to_be_admitted_does_not_count_as_waiting(long_reply_checkpoint):
    """batch 1 / queue 1, three quick submits on an idle server: one runs, one waits, only the third is busy."""
    with running_server(model=str(long_reply_checkpoint), max_batch_size=1, max_queue=1, max_input_chars=LIMIT,
                        max_new_tokens=4096) as small:
        results = flood(small, 3)
        accepted = [r for r in results if r.updates and r.event != "error"]
        assert len(accepted) == 2, [r.error or r.updates[:1] for r in results]
        assert_busy(next(r for r in results if not (r.updates and r.event != "error")))
        assert sum(r.waited for r in accepted) == 1
        assert all(p == 1 for r in accepted for p in queue_positions(r))
        wait_until(lambda: small.engine.load == (0, 0), 60, "an idle engine")


def test_20_mid_stream_disconnects_free_their_slots(server):
    """20 clients that go away after two streamed updates: every generation is cancelled, nothing runs for nobody."""
    cancelled = requests_ended(server, "cancelled")

    def one(i):
        return chat(server, chat_args(f"{MARK} leave {i}", max_new_tokens=2000, seed=200 + i),
                    leave_when=lambda r: len(r.replies) >= 2)

    with under_attack(server):
        with ThreadPoolExecutor(3) as pool:  # the normal conversation + 3 never exceed batch + queue
            results = list(pool.map(one, range(20)))
    assert all(r.disconnected and len(r.replies) >= 2 for r in results), [(r.event, r.error, r.disconnected, len(r.replies)) for r in results]
    wait_until(lambda: requests_ended(server, "cancelled") >= cancelled + 20, 60, "20 cancelled generations")
    wait_until(lambda: server.engine.load == (0, 0), 60, "an idle engine")


# -- disk ----------------------------------------------------------------------------------------------------------

def client_kept(js: str, n: int):
    """What a hostile browser sends where ``store.js`` would put what it read (the step's ``js`` says which): about
    100 kB of conversation each time, unsealed or in a damaged seal."""
    text = f"{MARK} conversation {n} " + "lorem ipsum dolor sit amet " * 90
    conversation = from_history([text_message(role, f"{role} {i} {text}") for i in range(20)
                                 for role in ("user", "assistant")]).to_dict()
    junk = "1." + ("A" * 100_000)
    metas = [[f"c{n}x{i}", junk[:5000], 10_000] for i in range(20)]
    if "pickFile" in js:
        return {"file": {"text": json.dumps(conversation)}, "metas": metas}
    if "all()" in js:
        return [[f"c{n}x{i}", junk] for i in range(5)]
    if "pendingVersion" in js:
        return "x" * 100_000
    return {"data": junk, "metas": metas, "tab": f"c{n}", "share": junk, "wide": True}


def test_client_supplied_conversations_write_no_files(server, http):
    """Every unqueued handler that takes what the browser kept (the stored conversations and the list, the one
    conversation an earlier version kept, an imported file, a version link), called as a browser would, 20 times
    with a new 100 kB conversation: each answers, and nothing piles up on disk."""
    page = PageClient(http)
    components = page.components
    stored_in = page.dependencies[page.load_handler()]["inputs"][0]
    kept = {i for i, c in components.items() if c["type"] == "browserstate"} | {stored_in}
    handlers = [i for i, dep in enumerate(page.dependencies)
                if kept & set(dep["inputs"]) and dep.get("queue") is False and dep["backend_fn"]]
    assert len(handlers) >= 5, handlers   # load, store, switch, version links, export, import
    statuses = Counter()
    with under_attack(server):
        for n in range(20):
            history = [text_message(role, f"{role} {i} {MARK} {n} " + "lorem ipsum dolor sit amet " * 90)
                       for i in range(20) for role in ("user", "assistant")]
            for index in handlers:
                dep = page.dependencies[index]
                data = [client_kept(dep.get("js") or "", n) if c == stored_in
                        else history if components[c]["type"] == "browserstate" else None for c in dep["inputs"]]
                statuses[run_fn(http, index, data, page.session).status_code] += 1
    assert statuses == Counter({200: 20 * len(handlers)}), statuses


def test_a_30_mb_upload_is_refused(server, http):
    with under_attack(server):
        response = http.post("gradio_api/upload", files={"files": (f"{MARK}.bin", b"\0" * 30_000_000)})
    assert response.status_code == 413, f"{response.status_code}: {response.text[:300]}"
    assert re.search(r"size|large|big", response.text, re.I), response.text[:300]
