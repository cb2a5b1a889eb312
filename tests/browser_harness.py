"""Shared browser-test support: Debian's Chromium driven by Playwright, the page's selectors, and helpers
that wait on conditions (never fixed sleeps).

Selectors (Gradio 6.31 DOM, chatglm_web/page/layout.py):
  * messages: ``#chatbot [data-testid="user"|"bot"]``; their raw (un-rendered) text is in the
    ``aria-label`` (``"bot's message: <text>"``), which is what the prefix checks use, since the
    rendered markdown/LaTeX of random text is not a prefix of its longer self. How a reply ended is a
    bot message of its own after it (``STOPPED``, ``CUT_OFF``: ``chatglm_web/page/markers.py``).
  * Retry / Undo / Clear / Edit: ``#chatbot button[aria-label="Retry"|"Undo"|"Clear"|"Edit"]``.
  * Send / Stop: ``#send`` / ``#stop`` (one of them is shown); the message box ``#chat-input textarea``.
  * The drawer ``#settings-drawer`` (``#open-settings`` opens it): ``#max-new-tokens``, ``#seed``, ``#mode``,
    ``#system-prompt``, ``#prompt-accordion`` (``#view-prompt`` under the message box opens it).
  * The statistics line and errors (prefixed "⚠️", never a toast): ``#reply-stats``.
  * The conversation list, the left sidebar ``#conversations-sidebar`` (open beside the chat on a window wider
    than 900 px, a sheet on phones): ``#new-chat``, ``#search-conversations``, ``#conversation-list`` (one
    radio per conversation, labelled with its title), ``#undo-delete``; this conversation's ``#conversation-title``,
    ``#share``, ``#delete-conversation``, ``#download-md``, ``#download-json``. Clear (the chat's trash button)
    starts a new conversation; the old one stays in the list.
  * What the page keeps (``chatglm_web/page/store.js``): each conversation sealed in localStorage
    (``chatglm-web:conversation:<id>``, ``chatglm-web:meta:<id>``), this tab's conversation id in
    sessionStorage (``chatglm-web:tab``).
"""

from __future__ import annotations

import re
import time
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import expect, sync_playwright

from chatglm_web.branding import load_branding
from chatglm_web.page import STORAGE_KEY  # noqa: F401  (where pages before the list kept their one conversation)
from waiting import wait_until  # noqa: F401  (the browser tests import it from here)
from server_harness import requests_ended
from chatglm_web.page.markers import is_marker, marker
from chatglm_web.page.strings import STRINGS

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
UI_TIMEOUT_MS = 20_000
TEXTAREA = "#chat-input textarea"
SEND = "#send"
STOP = "#stop"
OPEN_SETTINGS = "#open-settings"
DRAWER = "#settings-drawer"
SIDEBAR = "#conversations-sidebar"
NEW_CHAT = "#new-chat"
CONVERSATION_LIST = "#conversation-list"
UNDO_DELETE = "#undo-delete"
DELETE = "#delete-conversation"
#: store.js's keys
CONVERSATION_PREFIX, META_PREFIX, TAB_KEY = "chatglm-web:conversation:", "chatglm-web:meta:", "chatglm-web:tab"
MAX_NEW_TOKENS = '#max-new-tokens input[data-testid="number-input"]'
RETRY = '#chatbot button[aria-label="Retry"]'
UNDO = '#chatbot button[aria-label="Undo"]'
CLEAR = '#chatbot button[aria-label="Clear"]'
EDIT = '#chatbot button[aria-label="Edit"]'
STATS = "#reply-stats"
SEED = "#seed input"
TOAST = ".toast-body"
#: the ‹ n / m › links after a message with several versions (a message of its own, after it)
VERSION_NAV = "#chatbot .version-nav"
MESSAGES = '#chatbot [data-testid="user"], #chatbot [data-testid="bot"]'
#: how a reply ended, as the raw text of the bot message after it (English)
STOPPED = marker("stopped", "en")["content"]
CUT_OFF = marker("length", "en")["content"]


# -- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser():
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Session:
    """One fresh browser context (own localStorage) on the app, recording every request it makes."""

    def __init__(self, browser, server, *, width: int = 1280, height: int = 900, locale: str = "en-US",
                 color_scheme: str = "light"):
        self.server = server
        self.requests: list[str] = []
        self.page_errors: list[str] = []
        self.context = browser.new_context(viewport={"width": width, "height": height}, accept_downloads=True,
                                           locale=locale, color_scheme=color_scheme)
        self.context.on("request", lambda request: self.requests.append(request.url))
        self.page = self.context.new_page()
        self.page.on("pageerror", lambda error: self.page_errors.append(str(error)))
        self.page.set_default_timeout(UI_TIMEOUT_MS)
        expect.set_options(timeout=UI_TIMEOUT_MS)

    def open(self):
        self.page.goto(self.server.url)
        expect(self.page.locator(TEXTAREA)).to_be_editable()
        wait_for_page_load(self.page)
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

STEP_SECONDS = 0.02  # the least a decode step takes with ``unhurried_replies``


@pytest.fixture
def unhurried_replies(server, monkeypatch):
    """Each decode step of the engine takes at least STEP_SECONDS, so a 4000-token reply streams for over a
    minute, longer than any test needs it still streaming, however fast the machine (the tiny model alone
    writes it in seconds, and a reply that ended by itself leaves no Stop to press, nothing to interrupt)."""
    decode = server.engine.step.decode

    def unhurried(*args):
        time.sleep(STEP_SECONDS)   # not a wait for a condition: the model made slower
        return decode(*args)

    monkeypatch.setattr(server.engine.step, "decode", unhurried)


def messages(page, role: str) -> list[str]:
    """Raw text of every ``role`` ("user" or "bot") message, oldest first."""
    labels = page.eval_on_selector_all(f'#chatbot [data-testid="{role}"]',
                                       "els => els.map(e => e.getAttribute('aria-label'))")
    prefix = f"{role}'s message: "
    assert all(label.startswith(prefix) for label in labels), labels
    return [label[len(prefix):] for label in labels]


def wait_for_page_load(page):
    """Wait until the page's load event (the language, the settings and the conversation kept in the browser)
    has come back and been applied: it re-labels the message box with the model's name, in the same update
    that puts a restored conversation into the chat."""
    plain = [STRINGS["input_placeholder_plain"][0], STRINGS["input_placeholder_plain"][1]]
    page.wait_for_function("""(plain) => {
      const box = document.querySelector('#chat-input textarea');
      return box !== null && box.placeholder !== '' && !plain.includes(box.placeholder);
    }""", arg=plain)
    settle(page)


def reload(page):
    """Reload the page and wait until it has restored what the browser keeps."""
    page.reload()
    expect(page.locator(TEXTAREA)).to_be_editable()
    wait_for_page_load(page)


def drawer_is_open(page) -> bool:
    """Whether the settings drawer is open. Closed, it lies beside the viewport: its content is in the DOM and
    counts as visible to Playwright, but is outside the viewport (a click on it fails)."""
    return re.search(r"\bopen\b", page.locator(DRAWER).get_attribute("class") or "") is not None


def open_settings(page):
    """Open the settings drawer and wait until it has slid in completely."""
    if not drawer_is_open(page):
        page.locator(OPEN_SETTINGS).click()
    expect(page.locator(DRAWER)).to_have_class(re.compile(r"\bopen\b"))
    page.wait_for_function("""(selector) => {
      const box = document.querySelector(selector).getBoundingClientRect();
      return box.width > 0 && box.left >= 0 && box.right <= window.innerWidth + 1;
    }""", arg=DRAWER)
    settle(page)


def settle(page):
    """Let the front end finish what it has scheduled: Svelte runs its effects before the next frame."""
    page.evaluate("() => new Promise(done => requestAnimationFrame(() => requestAnimationFrame(done)))")


def set_seed(page, value: int):
    """Type ``value`` into the seed box and make sure it is still there once the page has settled.

    Like the slider (see ``set_max_new_tokens``), a value typed right after the settings opened has
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
    right after the settings opened; typing it again is what a user would do.
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
    expect(page.locator(SEND)).to_be_visible()
    expect(page.locator(STOP)).to_be_hidden()
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
    """Replies the server has ended (run to their end, stopped, or failed), as its metrics count them."""
    return sum(requests_ended(server, reason) for reason in ("stop", "length", "cancelled", "error"))


def wait_for_replies(page, server, before: int, count: int = 1):
    """Wait until ``count`` more generations finished on the server and the page shows the result."""
    wait_until(lambda: finished_total(server) >= before + count, 60, "the reply to finish on the server")
    wait_until(lambda: server.engine.load == (0, 0), 10, "the engine to become idle")
    expect_idle(page)
    expect(page.locator(STATS)).to_contain_text("tokens/s")


def saved_conversation(page) -> str:
    """This tab's conversation as store.js keeps it (sealed: only its length and changes tell); "" when none is."""
    return page.evaluate("""([tab, prefix]) => {
      const id = sessionStorage.getItem(tab);
      return id ? localStorage.getItem(prefix + id) : null;
    }""", [TAB_KEY, CONVERSATION_PREFIX]) or ""


def tab_conversation(page) -> str | None:
    """The id of the conversation this tab shows (store.js keeps it across a reload)."""
    return page.evaluate("key => sessionStorage.getItem(key)", TAB_KEY)


def stored_conversations(page) -> dict[str, str]:
    """Every conversation entry in localStorage: id -> sealed text."""
    return page.evaluate("""(prefix) => Object.fromEntries(Object.keys(localStorage).filter(k => k.startsWith(prefix))
      .map(k => [k.slice(prefix.length), localStorage.getItem(k)]))""", CONVERSATION_PREFIX)


def listed(page) -> list[str]:
    """The titles in the conversation list, as shown (newest first)."""
    return [t.strip() for t in page.locator(f"{CONVERSATION_LIST} label").all_inner_texts()]


def chosen(page) -> str | None:
    """The title of the conversation the list marks as this tab's (None when none is)."""
    found = page.locator(f"{CONVERSATION_LIST} label.selected")
    return found.inner_text().strip() if found.count() else None


def sidebar_is_open(page) -> bool:
    """Whether the conversation list is in view (closed, it lies beside the viewport, like the drawer)."""
    return page.locator(SIDEBAR).evaluate(
        "el => { const r = el.getBoundingClientRect(); return r.width > 0 && r.right > 0 && r.left < innerWidth; }")


def open_conversations(page):
    """Open the conversation list (on a wide window it is open already) and wait until it has slid in."""
    if not sidebar_is_open(page):
        page.locator(f"{SIDEBAR} button.toggle-button").click()
    page.wait_for_function("""(selector) => {
      const box = document.querySelector(selector).getBoundingClientRect();
      return box.width > 0 && box.left >= 0 && box.right <= window.innerWidth + 1;
    }""", arg=SIDEBAR)
    settle(page)


def pick_conversation(page, title: str):
    """Choose the conversation ``title`` in the list and wait until the chat shows it."""
    open_conversations(page)
    page.locator(f"{CONVERSATION_LIST} label", has_text=title).click()
    expect(page.locator(f"{CONVERSATION_LIST} label.selected")).to_have_text(title)


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


def is_version_nav(text: str) -> bool:
    return text.startswith('<span class="version-nav"')


def without_version_navs(texts: list[str]) -> list[str]:
    """The messages without the version links' messages."""
    return [text for text in texts if not is_version_nav(text)]


def replies(bots: list[str]) -> list[str]:
    """The bot messages that are replies (not how a reply ended, nor version links)."""
    return [text for text in without_version_navs(bots) if not is_marker(text)]


def short_exchange(page, server, text: str, max_new_tokens: int = 8):
    """Send ``text``; its reply runs to ``max_new_tokens`` (the test checkpoints never stop on their own), so
    it ends with the cut-off marker."""
    set_max_new_tokens(page, max_new_tokens)
    before = finished_total(server)
    send(page, text)
    wait_for_replies(page, server, before)
    expect(page.locator(STATS)).to_contain_text(f"reply {max_new_tokens} tokens")
    wait_until(lambda: messages(page, "bot")[-1:] == [CUT_OFF], 5, "the cut-off marker under the reply")
