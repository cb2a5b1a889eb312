"""The real page in headless Chromium against the real server (tiny random ChatGLM3 on loopback).

Covers what only a browser exercises: the page loads and works without any outside host,
a reply streams into the chat bubble, Stop cancels the generation on the server, the
Chatbot's Retry / Undo / Clear buttons, the conversation kept in browser storage (also across
a server restart), the page staying usable after an error, Stop while waiting for a slot,
and HTML in a message staying inside its bubble.

Selectors (Gradio 6.31 DOM):
  * messages: ``#chatbot [data-testid="user"|"bot"]``; their raw (un-rendered) text is in the
    ``aria-label`` (``"bot's message: <text>"``), which is what the prefix checks use, since
    the rendered markdown/LaTeX of random text is not a prefix of its longer self.
  * Retry / Undo / Clear: ``#chatbot button[aria-label="Retry"|"Undo"|"Clear"]``.
  * Send / Stop: ``#chat-input [data-testid="submit-button"|"stop-button"]``.
  * Max new tokens: ``#max-new-tokens input[data-testid="number-input"]`` inside the Settings accordion.
  * Error toasts: ``.toast-body``; a message the input box refuses: ``#chat-input div.validation-error``.

The replies are random characters; only their growth, length and identity are checked.
"""

from __future__ import annotations

import time
from urllib.parse import urlsplit

import pytest
from gradio_client import Client
from playwright.sync_api import expect, sync_playwright

from chatglm_web.branding import load_branding
from server_harness import free_port, running_server

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
UI_TIMEOUT_MS = 20_000
TEXTAREA = "#chat-input textarea"
SUBMIT = '#chat-input [data-testid="submit-button"]'
STOP = '#chat-input [data-testid="stop-button"]'
MAX_NEW_TOKENS = '#max-new-tokens input[data-testid="number-input"]'
RETRY = '#chatbot button[aria-label="Retry"]'
UNDO = '#chatbot button[aria-label="Undo"]'
CLEAR = '#chatbot button[aria-label="Clear"]'
STATS = "#reply-stats"
SEED = "#seed input"
TOAST = ".toast-body"
INPUT_REFUSED = "#chat-input div.validation-error"
MESSAGES = '#chatbot [data-testid="user"], #chatbot [data-testid="bot"]'
STORAGE_KEY = "chatglm-web-conversation"  # gr.BrowserState(storage_key=...) in chatglm_web/page/layout.py


# -- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def app_cache(tmp_path_factory):
    """A fresh app cache dir for this module's servers: the browser-storage key file is made there once."""
    with pytest.MonkeyPatch.context() as env:
        path = tmp_path_factory.mktemp("app-cache")
        env.setenv("CHATGLM_WEB_CACHE", str(path))
        env.delenv("CHATGLM_WEB_STATE_SECRET", raising=False)
        yield path


@pytest.fixture(scope="module")
def server(long_reply_checkpoint, app_cache):
    with running_server(model=str(long_reply_checkpoint), max_new_tokens=4096) as srv:
        yield srv


@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Session:
    """One fresh browser context (own localStorage) on the app, recording every request it makes."""

    def __init__(self, browser, server):
        self.server = server
        self.requests: list[str] = []
        self.page_errors: list[str] = []
        self.context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        self.context.on("request", lambda request: self.requests.append(request.url))
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        self.page.set_default_timeout(UI_TIMEOUT_MS)
        expect.set_options(timeout=UI_TIMEOUT_MS)

    def open(self):
        self.page.goto(self.server.url)
        expect(self.page.locator(TEXTAREA)).to_be_editable()
        return self

    def outside_requests(self) -> list[str]:
        outside = []
        for url in self.requests:
            parts = urlsplit(url)
            if parts.scheme in ("data", "blob"):  # in-page content, not a network request
                continue
            if parts.scheme not in ("http", "https", "ws", "wss") or parts.hostname not in LOOPBACK_HOSTS:
                outside.append(url)
        return outside

    def assert_air_gapped(self):
        assert self.requests, "no request was recorded at all"
        assert self.outside_requests() == [], "the page reached outside the loopback server"
        assert self.page_errors == [], "uncaught errors in the page"


@pytest.fixture
def session(browser, server):
    session = Session(browser, server)
    yield session.open()
    session.context.close()


# -- helpers ------------------------------------------------------------------------------------

def messages(page, role: str) -> list[str]:
    """Raw text of every ``role`` ("user" or "bot") message, oldest first."""
    labels = page.eval_on_selector_all(f'#chatbot [data-testid="{role}"]',
                                       "els => els.map(e => e.getAttribute('aria-label'))")
    prefix = f"{role}'s message: "
    assert all(label.startswith(prefix) for label in labels), labels
    return [label[len(prefix):] for label in labels]


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    assert predicate(), f"timed out after {timeout} s waiting for {what}"


def open_settings(page):
    """Open the Settings accordion that holds the sliders (Gradio renders its content lazily)."""
    if page.locator(MAX_NEW_TOKENS).is_visible():
        return
    # Walk from the last one: the page currently also shows an empty "Settings" accordion (see
    # test_one_settings_accordion); this keeps the other tests independent of that bug.
    headers = page.locator("button.label-wrap", has_text="Settings")
    for i in reversed(range(headers.count())):
        headers.nth(i).click()
        try:
            page.locator(MAX_NEW_TOKENS).wait_for(state="visible", timeout=3_000)
        except Exception:
            continue
        settle(page)
        return
    raise AssertionError("no Settings accordion shows the Max new tokens slider")


def settle(page):
    """Let the front end finish what it has scheduled: Svelte runs its effects before the next frame."""
    page.evaluate("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")


def set_seed(page, value: int):
    """Type ``value`` into the seed box and make sure it is still there once the page has settled.

    Like the slider (see ``set_max_new_tokens``), a value typed right after the accordion opened has
    been seen to go back to the old one on a loaded machine (CI, stop 15): the next message was then
    sent with the old seed.
    """
    open_settings(page)
    box = page.locator(SEED)
    for _ in range(3):
        box.fill(str(value))
        box.press("Enter")
        settle(page)
        if box.input_value() == str(value):
            return
    assert box.input_value() == str(value), f"the seed box shows {box.input_value()}, not {value}"


def set_max_new_tokens(page, value: int):
    """Type ``value`` into the slider's number box until the slider takes it.

    On a loaded machine the slider has been seen to keep its old value after the first input typed
    right after the accordion opened; typing it again is what a user would do.
    """
    open_settings(page)
    box, slider = page.locator(MAX_NEW_TOKENS), page.locator('#max-new-tokens input[type="range"]')
    for _ in range(3):
        box.fill(str(value))
        box.press("Enter")
        try:
            expect(slider).to_have_value(str(value), timeout=5_000)
            return
        except AssertionError:
            continue
    assert slider.input_value() == str(value), f"the slider shows {slider.input_value()}, the box {box.input_value()}"


def send(page, text: str):
    page.locator(TEXTAREA).fill(text)
    page.locator(TEXTAREA).press("Enter")


def expect_idle(page):
    """The page is ready for the next message: Send is back and the input box is editable."""
    expect(page.locator(SUBMIT)).to_be_visible()
    expect(page.locator(STOP)).to_have_count(0)
    expect(page.locator(TEXTAREA)).to_be_editable()


def streamed_snapshots(page, wanted: int = 4, timeout: float = 30) -> list[str]:
    """Watch the last bot bubble while a reply streams: its distinct texts, each checked to extend the previous."""
    snapshots = []
    deadline = time.monotonic() + timeout
    while len(set(snapshots)) < wanted and time.monotonic() < deadline:
        bots = messages(page, "bot")
        text = bots[-1] if bots else ""
        if text and not text.startswith("⏳") and (not snapshots or text != snapshots[-1]):
            snapshots.append(text)
        time.sleep(0.1)
    assert len(set(snapshots)) >= 2, f"the bubble did not grow: {[len(s) for s in snapshots]}"
    for earlier, later in zip(snapshots, snapshots[1:]):
        assert len(later) > len(earlier) and later.startswith(earlier), "each snapshot must extend the previous"
    return snapshots


def finished_total(server) -> int:
    return sum(server.engine.finished.values())


def wait_for_replies(page, server, before: int, count: int = 1):
    """Wait until ``count`` more generations finished on the server and the page shows the result."""
    wait_until(lambda: finished_total(server) >= before + count, 60, "the reply to finish on the server")
    wait_until(lambda: server.engine.load == (0, 0), 10, "the engine to become idle")
    expect_idle(page)
    expect(page.locator(STATS)).to_contain_text("tokens/s")


def saved_conversation(page) -> str:
    """The conversation as gr.BrowserState stored it (encrypted: only its length and changes tell)."""
    return page.evaluate("key => localStorage.getItem(key)", STORAGE_KEY) or ""


def wait_for_saved_conversation(page, previous: str, timeout: float = 3.0):
    """Wait until the stored conversation differs from ``previous`` and has not changed for half a second.

    Returns quietly after ``timeout``: the caller's checks after a reload say what went wrong.
    """
    last, stable_since, deadline = None, time.monotonic(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = saved_conversation(page)
        if value != last:
            last, stable_since = value, time.monotonic()
        elif value != previous and time.monotonic() - stable_since >= 0.5:
            return
        time.sleep(0.1)


def wait_for_restored(page, users: int):
    """Wait (at most 5 s) until ``users`` user messages are shown; returns quietly: the caller's asserts say what came."""
    try:
        page.wait_for_function(f"() => document.querySelectorAll('#chatbot [data-testid=\"user\"]').length >= {users}",
                               timeout=5_000)
    except Exception:
        pass


def set_textarea_with_unpaired_surrogate(page, text: str):
    """Put ``text`` + an unpaired surrogate into the input box (made in the page: no keyboard types one)."""
    page.locator(TEXTAREA).evaluate(
        "(box, text) => { box.value = text + String.fromCharCode(0xD800); "
        "box.dispatchEvent(new Event('input', {bubbles: true})); }", text)


def record_prompts(server, monkeypatch) -> list:
    """The prompt ids of every generation submitted from now on."""
    prompts = []
    submit = server.engine.submit
    monkeypatch.setattr(server.engine, "submit", lambda ids, *rest: prompts.append(ids) or submit(ids, *rest))
    return prompts


def chat_prompt(server, *texts: str) -> list[int]:
    """The prompt ids the page must send: the default system prompt, then ``texts`` as user messages."""
    system = [{"role": "system", "content": load_branding().system_prompt}]
    return server.backend.format.tokenizer.build_chat_input(system + [{"role": "user", "content": t} for t in texts])


def inside(inner: dict, outer: dict, slack: float = 1.0) -> bool:
    return (inner["x"] >= outer["x"] - slack and inner["y"] >= outer["y"] - slack
            and inner["x"] + inner["width"] <= outer["x"] + outer["width"] + slack
            and inner["y"] + inner["height"] <= outer["y"] + outer["height"] + slack)


def short_exchange(page, server, text: str, max_new_tokens: int = 8):
    set_max_new_tokens(page, max_new_tokens)
    before = finished_total(server)
    send(page, text)
    wait_for_replies(page, server, before)
    expect(page.locator(STATS)).to_contain_text(f"reply {max_new_tokens} tokens")


# -- tests --------------------------------------------------------------------------------------

def test_stream_stop_retry_undo(session, server):
    page = session.page
    expect(page.locator("#model-info")).to_contain_text(str(server.backend.info.name))
    expect(page.locator('#chatbot [data-testid="bot"], #chatbot [data-testid="user"]')).to_have_count(0)

    # 1. A long reply streams into the bubble: several growing snapshots, each a prefix of the next.
    set_max_new_tokens(page, 4096)
    cancelled_before = server.engine.finished["cancelled"]
    send(page, "Tell me a long story")
    expect(page.locator(STOP)).to_be_visible()
    expect(page.locator('#chatbot [data-testid="bot"]')).to_have_count(1)
    snapshots = streamed_snapshots(page)
    assert server.engine.load[0] == 1, "the reply should still be generating when Stop is pressed"

    # 2. Stop: the server cancels the generation, the engine drains and the bubble stops growing.
    page.locator(STOP).click()
    wait_until(lambda: server.engine.finished["cancelled"] > cancelled_before, 5, "a cancellation on the server")
    wait_until(lambda: server.engine.load == (0, 0), 5, "engine.load to return to (0, 0)")
    expect_idle(page)
    stopped = messages(page, "bot")[-1]
    time.sleep(1.0)  # nothing may arrive after the stop
    assert messages(page, "bot")[-1] == stopped
    assert stopped.startswith(snapshots[-1])
    assert messages(page, "user") == ["Tell me a long story"]

    # 3. A second, short message completes with a statistics line.
    short_exchange(page, server, "Short one", max_new_tokens=8)
    assert messages(page, "user") == ["Tell me a long story", "Short one"]
    first_reply, second_reply = messages(page, "bot")
    assert first_reply == stopped and second_reply
    expect(page.locator(STATS)).to_contain_text("stopped at the max-new-tokens limit")

    # 4. Retry: the last answer is generated again (seed -1: a different text), nothing else changes.
    before = finished_total(server)
    expect(page.locator(RETRY)).to_have_count(1)
    page.locator(RETRY).click()
    wait_for_replies(page, server, before)
    wait_until(lambda: messages(page, "bot")[-1] != second_reply, 5, "the retried reply to replace the old one")
    assert messages(page, "user") == ["Tell me a long story", "Short one"]
    bots = messages(page, "bot")
    assert len(bots) == 2 and bots[0] == stopped and bots[1] and bots[1] != second_reply
    expect(page.locator(STATS)).to_contain_text("reply 8 tokens")

    # 5. Undo: the last exchange disappears and its question goes back into the input box.
    page.locator(UNDO).click()
    expect(page.locator('#chatbot [data-testid="user"]')).to_have_count(1)
    expect(page.locator(TEXTAREA)).to_have_value("Short one")
    assert messages(page, "user") == ["Tell me a long story"]
    assert messages(page, "bot") == [stopped]

    # ... and can be sent again from there.
    before = finished_total(server)
    page.locator(TEXTAREA).press("Enter")
    wait_for_replies(page, server, before)
    assert messages(page, "user") == ["Tell me a long story", "Short one"]
    assert len(messages(page, "bot")) == 2
    expect(page.locator(TEXTAREA)).to_have_value("")

    session.assert_air_gapped()


def test_clear_empties_the_chat_and_it_stays_empty_after_reload(session, server):
    page = session.page
    short_exchange(page, server, "Remember me?", max_new_tokens=6)
    assert messages(page, "user") == ["Remember me?"]
    wait_for_saved_conversation(page, previous="")
    before_clear = saved_conversation(page)
    page.locator(CLEAR).click()
    expect(page.locator('#chatbot [data-testid="user"], #chatbot [data-testid="bot"]')).to_have_count(0)
    wait_for_saved_conversation(page, previous=before_clear)  # the page shows [] before the server stored it
    page.reload()
    expect(page.locator(TEXTAREA)).to_be_editable()
    placeholder = load_branding().placeholder
    if placeholder:
        expect(page.locator("#chatbot")).to_contain_text(placeholder)  # shown only while the chat is empty
    time.sleep(1.0)  # give the restore-on-load event time to bring something back, were it wrong
    assert messages(page, "user") == [] and messages(page, "bot") == []
    session.assert_air_gapped()


def test_conversation_is_restored_after_reload(session, server):
    page = session.page
    short_exchange(page, server, "First question", max_new_tokens=6)
    before_second = saved_conversation(page)
    short_exchange(page, server, "Second question", max_new_tokens=6)
    users, bots = messages(page, "user"), messages(page, "bot")
    assert users == ["First question", "Second question"] and len(bots) == 2
    wait_for_saved_conversation(page, previous=before_second)
    page.reload()
    page.locator(TEXTAREA).wait_for(state="visible")
    wait_for_restored(page, 2)
    assert messages(page, "user") == users, "the conversation was not restored from browser storage"
    assert messages(page, "bot") == bots, "the replies came back different from what was shown"

    # Clear forgets it for good.
    before_clear = saved_conversation(page)
    page.locator(CLEAR).click()
    expect(page.locator('#chatbot [data-testid="user"]')).to_have_count(0)
    wait_for_saved_conversation(page, previous=before_clear)  # the page shows [] before the server stored it
    page.reload()
    page.locator(TEXTAREA).wait_for(state="visible")
    time.sleep(1.0)  # give the restore-on-load event time to bring something back, were it wrong
    assert messages(page, "user") == [] and messages(page, "bot") == [], "Clear did not forget the conversation"
    session.assert_air_gapped()


def test_undo_of_the_only_exchange_stays_undone_after_reload(session, server):
    page = session.page
    short_exchange(page, server, "Forget this", max_new_tokens=4)
    wait_for_saved_conversation(page, previous="")
    before_undo = saved_conversation(page)
    page.locator(UNDO).click()
    expect(page.locator(MESSAGES)).to_have_count(0)
    expect(page.locator(TEXTAREA)).to_have_value("Forget this")
    wait_for_saved_conversation(page, previous=before_undo)
    page.reload()
    expect(page.locator(TEXTAREA)).to_be_editable()
    time.sleep(1.0)  # give the restore-on-load event time to bring something back, were it wrong
    assert messages(page, "user") == [] and messages(page, "bot") == [], "the undone exchange came back"
    session.assert_air_gapped()


def test_one_settings_accordion(session):
    page = session.page
    assert page.locator("button.label-wrap", has_text="Settings").count() == 1
    open_settings(page)
    expect(page.locator("#system-prompt textarea")).to_be_visible()


def test_markdown_and_latex_render_and_html_is_sanitized(session, server):
    page = session.page
    text = 'Hi <img src=x onerror="window.__xss = 1"> **bold** $x^2$'
    short_exchange(page, server, text, max_new_tokens=4)
    bubble = page.locator('#chatbot [data-testid="user"]').last
    expect(bubble.locator("strong")).to_have_text("bold")
    expect(bubble.locator(".katex").first).to_be_attached()
    assert page.evaluate("() => window.__xss") is None, "an event handler from chat text ran"
    assert bubble.locator("img[onerror]").count() == 0
    session.assert_air_gapped()


def test_after_an_error_the_message_comes_back_and_the_next_one_streams(session, server, monkeypatch):
    page = session.page
    prompts = record_prompts(server, monkeypatch)

    # 1. A message longer than the context: the error is shown, the input box is usable and holds the message.
    too_long = "word " * 3000  # about 9000 tokens; the context leaves 7168 for the prompt
    send(page, too_long)
    expect(page.locator(TOAST, has_text="too long")).to_be_visible()
    expect_idle(page)
    expect(page.locator(TEXTAREA)).to_have_value(too_long)
    expect(page.locator(MESSAGES)).to_have_count(0)
    expect(page.locator(STATS)).to_contain_text("too long")  # still there when the toast has gone

    # 2. An invalid value (seed -5): refused naming the option; the new message is given back too.
    set_seed(page, -5)
    send(page, "Short one")
    expect(page.locator(STATS)).to_contain_text("seed must be")
    expect_idle(page)
    expect(page.locator(TEXTAREA)).to_have_value("Short one")
    expect(page.locator(MESSAGES)).to_have_count(0)

    # 3. A character that cannot be sent (an unpaired surrogate): the input box refuses it and keeps the text.
    set_textarea_with_unpaired_surrogate(page, "Short one")
    page.locator(TEXTAREA).press("Enter")
    expect(page.locator(INPUT_REFUSED)).to_contain_text("invalid character")
    expect_idle(page)
    assert page.locator(TEXTAREA).evaluate("box => box.value.length") == len("Short one") + 1
    expect(page.locator(MESSAGES)).to_have_count(0)
    assert prompts == [], "a refused message reached the model"

    # 4. With the seed fixed, the same page sends the next message and its reply streams in.
    set_seed(page, -1)
    set_max_new_tokens(page, 1000)  # long enough to be seen growing on a loaded machine, too
    before = finished_total(server)
    send(page, "Short one")
    streamed_snapshots(page, wanted=3)
    wait_for_replies(page, server, before)
    expect(page.locator(STATS)).to_contain_text("reply 1000 tokens")
    assert messages(page, "user") == ["Short one"] and len(messages(page, "bot")) == 1
    assert prompts == [chat_prompt(server, "Short one")], "the failed messages were sent as history"
    session.assert_air_gapped()


def test_the_conversation_survives_a_server_restart(browser, long_reply_checkpoint, app_cache):
    """A new server process on the same port with the same key source (the app's cache dir) finds it again."""
    port = free_port()
    with running_server(model=str(long_reply_checkpoint), max_new_tokens=4096, port=port) as first:
        session = Session(browser, first).open()
        page = session.page
        try:
            short_exchange(page, first, "Remember me after a restart", max_new_tokens=6)
            users, bots = messages(page, "user"), messages(page, "bot")
            wait_for_saved_conversation(page, previous="")
        except BaseException:
            session.context.close()
            raise
    try:
        with running_server(model=str(long_reply_checkpoint), max_new_tokens=4096, port=port) as second:
            page.reload()
            expect(page.locator(TEXTAREA)).to_be_editable()
            wait_for_restored(page, 1)
            assert messages(page, "user") == users, "the conversation was lost in the restart"
            assert messages(page, "bot") == bots

            # It goes on from there, and the download holds all of it.
            short_exchange(page, second, "And after it?", max_new_tokens=6)
            assert messages(page, "user") == users + ["And after it?"]
            with page.expect_download() as download:
                page.locator("#download-md").click()
            text = open(download.value.path(), encoding="utf-8").read()
            assert download.value.suggested_filename == "conversation.md"
            assert "## User\n\nRemember me after a restart\n" in text and "## User\n\nAnd after it?\n" in text
            assert text.count("## Assistant") == 2
            assert session.outside_requests() == []
    finally:
        session.context.close()


def test_a_stored_conversation_that_cannot_be_read_is_left_alone(session):
    """Stored under another key (say CHATGLM_WEB_STATE_SECRET was changed): the page starts empty and does not
    overwrite it, so going back to the old key brings the conversation back."""
    page = session.page
    foreign = "AAAAAAAAAAAAAAAAAAAAAA==:" + "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA="  # iv:ciphertext, other key
    page.evaluate("([key, value]) => localStorage.setItem(key, value)", [STORAGE_KEY, foreign])
    page.reload()
    expect(page.locator(TEXTAREA)).to_be_editable()
    time.sleep(1.0)  # give the page time to write over it, were it wrong
    assert messages(page, "user") == [] and messages(page, "bot") == []
    assert saved_conversation(page) == foreign, "the stored conversation was overwritten"
    session.assert_air_gapped()


@pytest.fixture
def single_slot_server(long_reply_checkpoint, app_cache):
    with running_server(model=str(long_reply_checkpoint), max_new_tokens=4096, max_batch_size=1) as srv:
        yield srv


def test_stop_while_waiting_for_a_slot_leaves_no_status_in_the_chat(browser, single_slot_server, monkeypatch):
    server = single_slot_server
    session = Session(browser, server).open()
    page = session.page
    try:
        set_max_new_tokens(page, 8)
        other_user = Client(server.url, verbose=False).submit(
            "Keep the only slot busy", "", 0.8, 0.8, 4000, 0, 1.0, -1, api_name="/chat")
        wait_until(lambda: server.engine.load == (1, 0), 60, "another user's reply to take the only slot")

        cancelled = server.engine.finished["cancelled"]
        send(page, "I will wait")
        expect(page.locator(f'{STATS}, #chatbot [data-testid="bot"]', has_text="Waiting for a free slot")).to_have_count(1)
        assert not any("⏳" in text for text in messages(page, "bot")), "the waiting line is shown as a reply"
        expect(page.locator(STATS)).to_contain_text("Waiting for a free slot")
        page.locator(STOP).click()
        wait_until(lambda: server.engine.finished["cancelled"] > cancelled, 10, "the waiting request to be cancelled")
        expect_idle(page)
        expect(page.locator(STATS)).not_to_contain_text("Waiting")
        assert messages(page, "user") == ["I will wait"] and messages(page, "bot") == []

        other_user.cancel()
        wait_until(lambda: server.engine.load == (0, 0), 10, "the slot to be free")
        prompts = record_prompts(server, monkeypatch)
        short_exchange(page, server, "Next question", max_new_tokens=8)
        assert not any("⏳" in text for text in messages(page, "bot"))
        assert prompts == [chat_prompt(server, "I will wait", "Next question")], "status text was sent as history"
        session.assert_air_gapped()
    finally:
        session.context.close()


def test_html_in_a_message_stays_inside_its_bubble(session, server):
    """Sanitizing keeps inline styles: a position:fixed cover must still be clipped to its own bubble."""
    page = session.page
    text = ('Look: <div id="cover" style="position:fixed;inset:0;z-index:99999;background:red">'
            '<a href="http://127.0.0.1:9/">click me</a></div> end')
    short_exchange(page, server, text, max_new_tokens=4)
    bubble = page.locator('#chatbot [data-testid="user"]').last
    cover, box = page.locator("#cover").bounding_box(), bubble.bounding_box()
    assert cover and box and inside(cover, box), f"the cover {cover} is not inside its bubble {box}"
    for selector in (TEXTAREA, "#brand-header h1"):  # the rest of the page is not covered
        page.locator(selector).scroll_into_view_if_needed()
        target = page.locator(selector).bounding_box()
        x, y = target["x"] + target["width"] / 2, target["y"] + target["height"] / 2
        assert page.evaluate("([x, y]) => !document.elementFromPoint(x, y).closest('#cover')", [x, y]), selector
    session.assert_air_gapped()
