"""The conversations of issue 19 as a visitor meets them in Debian's Chromium, against the real server (tiny
ChatGLM3 whose replies run to max_new_tokens): the list (new, switch, delete and undo, search, rename), two
tabs chatting at once, versions after Retry and Edit (and the downloads), share links (read-only view,
Replay, a tampered link), the token meter and the exact prompt, the move of a conversation an older version
kept, and export then import.

What the browser keeps is sealed by the server; the tests start the server with a known state secret, so
they can open what the page stored (``BrowserStore``) and wait until a step has been written before they
reload (the page stores after the reply, in steps of its own).
"""

from __future__ import annotations

import inspect
import json
import re

import gradio as gr
import pytest
from playwright.sync_api import expect

from browser_harness import (CUT_OFF, EDIT, RETRY, STATS, STOP, STOPPED, TEXTAREA, UI_TIMEOUT_MS, Session,  # noqa: F401
                             browser, expect_idle, finished_total, reload, send, set_max_new_tokens, set_seed,
                             unhurried_replies, wait_for_page_load, wait_until)
from chatglm_web.browser_secret import ENV_VAR
from chatglm_web.conversations.browser_store import EXPORT_FORMAT, BrowserStore
from chatglm_web.conversations.tree import Conversation
from chatglm_web.page import STORAGE_KEY
from chatglm_web.page.markers import marker
from chatglm_web.page.strings import STRINGS
from server_harness import free_port, running_server

pytestmark = pytest.mark.browser

SECRET = "conversations-page-test-secret"
STORE = BrowserStore(SECRET)
DATA, TAB = "chatglm-web:conversation:", "chatglm-web:tab"   # store.js's keys
LIST = "#conversation-list label"
SEARCH = "#search-conversations textarea"
TITLE = "#conversation-title textarea"
SHARE_LINK = "#share-link textarea"
NAV = "#chatbot .version-nav"
USER_NAV = '#chatbot [data-testid="user"] .version-nav'
REPLY_NAV = '#chatbot [data-testid="bot"] .version-nav'
PREVIOUS = 'a[href^="#version:"][href$=":-1"]'
NEXT = 'a[href^="#version:"][href$=":1"]'
REPLY_WAIT = 90      # seconds: a reply on a loaded 2-core machine
STORE_WAIT = 30      # seconds: the page's storing steps after a change
METER = re.compile(r"([\d,]+) / ([\d,]+) tokens · system ([\d,]+) · history ([\d,]+) · new ([\d,]+)")


# -- fixtures -------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(long_reply_checkpoint, tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CHATGLM_WEB_CACHE", str(tmp_path_factory.mktemp("app-cache")))
        env.setenv(ENV_VAR, SECRET)   # what the page keeps is sealed with it: the tests open it with STORE
        with running_server(model=str(long_reply_checkpoint), max_new_tokens=4096) as srv:
            yield srv


@pytest.fixture
def visit(browser, server):
    """Open the page in a fresh browser context (its own storage); at the end, no page had an uncaught error."""
    sessions = []

    def open_page(url: str | None = None, **options) -> Session:
        """``url``: a link to open instead of the page's address (the first page this browser opens)."""
        session = Session(browser, server, **options)
        sessions.append(session)
        if url is None:
            return session.open()
        session.page.goto(url)
        return session

    yield open_page
    for session in sessions:
        errors = list(session.page_errors)
        session.context.close()
        assert errors == [], f"uncaught errors in the page: {errors}"


# -- helpers ------------------------------------------------------------------------------------------------

def chat(page) -> list[tuple[str, str]]:
    """(role, raw text) of every message the chat shows, oldest first, without the version links."""
    found = page.eval_on_selector_all('#chatbot [data-testid="user"], #chatbot [data-testid="bot"]',
                                      "els => els.map(e => [e.dataset.testid, e.getAttribute('aria-label')])")
    out = []
    for role, label in found:
        text = label[len(f"{role}'s message: "):]
        if not text.startswith('<span class="version-nav"'):
            out.append((role, text))
    return out


def said(page, role: str = "user") -> list[str]:
    return [text for who, text in chat(page) if who == role]


def replies(page) -> list[str]:
    return [text for who, text in chat(page) if who == "bot" and text not in (STOPPED, CUT_OFF)]


def nav_counts(page, selector: str = NAV) -> list[str]:
    return page.locator(f"{selector} .nav-count").all_inner_texts()


def titles(page) -> list[str]:
    return [t.strip() for t in page.locator(LIST).all_inner_texts()]


def expect_titles(page, wanted: set[str], what: str):
    try:
        wait_until(lambda: sorted(titles(page)) == sorted(wanted), STORE_WAIT, f"{what}: the list to be {wanted}")
    except AssertionError as error:
        note = page.locator("#list-note").inner_text()
        raise AssertionError(f"{error}; it shows {titles(page)} ({note}), the chat {chat(page)}") from None


def tab_id(page) -> str | None:
    return page.evaluate("key => sessionStorage.getItem(key)", TAB)


def stored(page, conversation_id: str | None = None):
    """The conversation the page stored (this tab's by default), opened as the server opens it; None if none."""
    conversation_id = conversation_id or tab_id(page)
    if not conversation_id:
        return None
    return STORE.open_or_none(page.evaluate("key => localStorage.getItem(key)", DATA + conversation_id),
                              conversation_id)


def stored_titles(page) -> list[str]:
    return [row.title for row in STORE.rows(page.evaluate("() => window.chatglmStore.metas()"))]


def user_texts(conversation) -> list[str]:
    return [m["content"] for node in conversation.path() if node.role == "user" for m in node.messages]


def wait_stored(page, check, what: str):
    """Wait until this tab's stored conversation passes ``check`` (the page has written the last step)."""
    def passes() -> bool:
        conversation = stored(page)
        return conversation is not None and check(conversation)

    wait_until(passes, STORE_WAIT, f"the page to store {what}")


def wait_chat(page, condition, timeout: float, what: str):
    """``wait_until`` for what the chat shows; a failure says what it showed."""
    try:
        wait_until(condition, timeout, what)
    except AssertionError as error:
        raise AssertionError(f"{error}; the chat shows {chat(page)}, versions {nav_counts(page)}") from None


def as_shown(text: str) -> str:
    """A message's text as the chat shows it: Gradio's Chatbot passes text through ``inspect.cleandoc`` (a random
    reply may begin with a space or a newline)."""
    return inspect.cleandoc(text)


def wait_reply(page, server, before: int, also=lambda conversation: True):
    """Wait until the reply after ``before`` finished generations is shown whole (cut off at max_new_tokens),
    and stored as shown: the stored conversation's last reply is that text, ended, and passes ``also``."""
    wait_until(lambda: finished_total(server) > before, REPLY_WAIT, "the reply to finish on the server")
    expect_idle(page)
    wait_chat(page, lambda: chat(page)[-1:] == [("bot", CUT_OFF)], STORE_WAIT, "the reply's end marker in the chat")
    shown = replies(page)[-1]

    def kept(conversation) -> bool:
        last = conversation.last()
        return (last.role == "assistant" and last.end == "length" and bool(last.messages)
                and as_shown(last.messages[-1]["content"]) == shown and also(conversation))

    try:
        wait_stored(page, kept, "the whole reply")
    except AssertionError as error:
        last = (stored(page) or Conversation()).last()
        raise AssertionError(f"{error}: shown {shown!r}, stored {last.role} {last.end} {last.messages!r}") from None
    return shown


def exchange(page, server, text: str, max_new_tokens: int | None = 8) -> str:
    """Send ``text`` and wait for its (cut-off) reply, shown and stored; the reply's text."""
    if max_new_tokens is not None:
        set_max_new_tokens(page, max_new_tokens)
    before = finished_total(server)
    send(page, text)
    reply = wait_reply(page, server, before, lambda c: user_texts(c)[-1:] == [text])
    assert said(page)[-1] == text
    return reply


def open_tab(context, server):
    """Another tab of the same browser (shared localStorage, its own sessionStorage) on the page."""
    page = context.new_page()
    page.set_default_timeout(UI_TIMEOUT_MS)
    page.goto(server.url)
    expect(page.locator(TEXTAREA)).to_be_editable()
    wait_for_page_load(page)
    return page


def choose(page, title: str):
    page.locator(LIST, has_text=title).click()


def type_search(page, text: str):
    """Type ``text`` into the search box key by key, after erasing what is there (Backspace: Gradio 6.31's
    Textbox sends no ``input`` event for it, only ``change``)."""
    box = page.locator(SEARCH)
    box.click()
    if box.input_value():
        box.press("ControlOrMeta+a")
        box.press("Backspace")
    box.press_sequentially(text, delay=20)


def start_streaming(page, text: str):
    """Send ``text`` with a budget far longer than the test and wait until its reply streams."""
    set_max_new_tokens(page, 4000)
    send(page, text)
    expect(page.locator(STOP)).to_be_visible()
    wait_until(lambda: len(replies(page)) > 0 and len(replies(page)[-1]) > 5, REPLY_WAIT, f"the reply to “{text}”")


def download(page, selector: str) -> str:
    with page.expect_download() as info:
        page.locator(selector).click()
    return info.value.path().read_text(encoding="utf-8")


def meter(page) -> dict | None:
    found = METER.search(page.locator("#token-meter").inner_text())
    if found is None:
        return None
    total, context, system, history, new = (int(g.replace(",", "")) for g in found.groups())
    return {"total": total, "context": context, "system": system, "history": history, "new": new}


# -- 1. the list ----------------------------------------------------------------------------------------------

def test_new_switch_delete_undo_search_and_rename(visit, server):
    page = visit().page
    expect(page.locator("#conversations-sidebar")).to_have_class(re.compile(r"\bopen\b"))   # wide: open
    expect(page.locator(LIST)).to_have_count(0)
    first_reply = exchange(page, server, "first topic")
    expect_titles(page, {"first topic"}, "after the first message")
    expect(page.locator(TITLE)).to_have_value("first topic")

    # New: an empty conversation; the first one stays in the list under its automatic title
    page.locator("#new-chat").click()
    wait_chat(page, lambda: chat(page) == [], STORE_WAIT, "the chat to be empty after New")
    expect(page.locator(TITLE)).to_have_value("")
    expect_titles(page, {"first topic"}, "after New")
    expect(page.locator(f"{LIST} input:checked")).to_have_count(0)   # the new one is not listed yet
    second_reply = exchange(page, server, "second topic")
    expect_titles(page, {"first topic", "second topic"}, "after the second conversation's message")

    # switching back shows the first conversation
    choose(page, "first topic")
    wait_chat(page, lambda: said(page) == ["first topic"] and replies(page) == [first_reply], STORE_WAIT,
              "the first conversation to be shown")
    expect(page.locator(LIST, has_text="first topic").locator("input")).to_be_checked()
    expect(page.locator(TITLE)).to_have_value("first topic")

    # Delete takes it out of the list (and the browser); Undo brings it back
    first_id = tab_id(page)
    page.locator("#delete-conversation").click()
    expect_titles(page, {"second topic"}, "after Delete")
    wait_chat(page, lambda: chat(page) == [], STORE_WAIT, "an empty chat after Delete")
    expect(page.locator("#list-note")).to_contain_text("Deleted “first topic”.")
    wait_until(lambda: stored(page, first_id) is None, STORE_WAIT, "the deleted conversation to leave storage")
    page.locator("#undo-delete").click()
    expect_titles(page, {"first topic", "second topic"}, "after Undo")
    wait_chat(page, lambda: said(page) == ["first topic"] and replies(page) == [first_reply], STORE_WAIT,
              "the restored conversation to be shown")
    expect(page.locator("#undo-delete")).to_be_hidden()
    wait_until(lambda: stored(page, first_id) is not None, STORE_WAIT, "the restored conversation to be stored")

    # search filters by title as one types; an emptied search shows them all again
    type_search(page, "second")
    expect_titles(page, {"second topic"}, "searching “second”")
    type_search(page, "no such title")
    expect_titles(page, set(), "searching for a missing title")
    type_search(page, "")
    expect_titles(page, {"first topic", "second topic"}, "after clearing the search")

    # rename: Enter in the title box; the list follows, and both survive a reload
    page.locator(TITLE).fill("Renamed topic")
    page.locator(TITLE).press("Enter")
    expect_titles(page, {"Renamed topic", "second topic"}, "after renaming")
    wait_stored(page, lambda c: c.title == "Renamed topic" and c.titled_by_user, "the new title")
    wait_until(lambda: sorted(stored_titles(page)) == ["Renamed topic", "second topic"], STORE_WAIT,
               "the list's stored titles")
    reload(page)
    expect_titles(page, {"Renamed topic", "second topic"}, "after a reload")
    expect(page.locator(TITLE)).to_have_value("Renamed topic")
    assert said(page) == ["first topic"] and replies(page) == [first_reply]
    choose(page, "second topic")
    wait_chat(page, lambda: said(page) == ["second topic"] and replies(page) == [second_reply], STORE_WAIT,
              "the second conversation after the reload")


# -- 2. two tabs at once -------------------------------------------------------------------------------------

def test_two_tabs_chatting_at_once_keep_their_own_conversations(visit, server, unhurried_replies):
    session = visit()
    one = session.page
    two = open_tab(session.context, server)
    two.on("pageerror", lambda error: session.page_errors.append(str(error)))

    start_streaming(one, "alpha from tab one")
    start_streaming(two, "beta from tab two")
    wait_until(lambda: server.engine.load[0] == 2, 30, "both replies to be generating at once")
    expect(one.locator(STOP)).to_be_visible()   # tab one is still streaming while tab two streams

    for page in (one, two):
        page.locator(STOP).dispatch_event("click")   # (the button itself: the streaming chat keeps re-laying the page out)
    for page in (one, two):
        expect_idle(page)
        wait_until(lambda page=page: chat(page)[-1:] == [("bot", STOPPED)], STORE_WAIT, "the stopped marker")
        wait_stored(page, lambda c: c.last().end == "stopped", "the stopped reply")
    wait_until(lambda: server.engine.load == (0, 0), 30, "the engine to become idle")
    assert tab_id(one) != tab_id(two)
    kept = {page: replies(page)[-1] for page in (one, two)}
    for page in (one, two):   # each list follows the other tab's conversation (a storage event reads it again)
        expect_titles(page, {"alpha from tab one", "beta from tab two"}, "both conversations before a reload")

    for page, text in ((one, "alpha from tab one"), (two, "beta from tab two")):
        reload(page)
        wait_until(lambda page=page, text=text: said(page) == [text], STORE_WAIT,
                   f"the tab to show its own conversation ({text})")
        assert replies(page) == [kept[page]] and chat(page)[-1] == ("bot", STOPPED)
        expect_titles(page, {"alpha from tab one", "beta from tab two"}, "both conversations in the list")
        expect(page.locator(LIST, has_text=text).locator("input")).to_be_checked()


def test_a_new_tab_lists_the_conversations_kept_before(visit, server):
    session = visit()
    exchange(session.page, server, "kept before the new tab")
    expect_titles(session.page, {"kept before the new tab"}, "in the first tab")
    other = open_tab(session.context, server)
    other.on("pageerror", lambda error: session.page_errors.append(str(error)))
    assert said(other) == []
    expect(other.locator("#list-note")).to_contain_text("1 of 100 conversations")
    expect_titles(other, {"kept before the new tab"}, "in a new tab")   # filled by the load itself
    expect(other.locator(f"{LIST} input:checked")).to_have_count(0)   # the new tab's own is not listed yet


# -- 3. versions after Retry and Edit ------------------------------------------------------------------------

def test_versions_after_retry_and_edit_survive_a_reload_and_the_downloads(visit, server):
    page = visit().page
    set_seed(page, 11)
    first_reply = exchange(page, server, "first question")
    assert nav_counts(page) == []

    # Retry: a second version of the reply, shown as 2 / 2; ‹ brings back the first
    set_seed(page, 22)   # another seed: another reply
    before = finished_total(server)
    page.locator(RETRY).click()
    retried = wait_reply(page, server, before)
    assert retried != first_reply
    expect(page.locator(REPLY_NAV).locator(".nav-count")).to_have_text("2 / 2")
    page.locator(REPLY_NAV).locator(PREVIOUS).click()
    expect(page.locator(REPLY_NAV).locator(".nav-count")).to_have_text("1 / 2")
    wait_chat(page, lambda: replies(page) == [first_reply], STORE_WAIT, "the first reply back")
    assert said(page) == ["first question"]

    # Edit the first message: the edited text, 2 / 2, and its own reply
    set_seed(page, 33)
    before = finished_total(server)
    page.locator(EDIT).first.click()
    page.locator("#chatbot textarea").fill("edited question")
    page.get_by_role("button", name="Submit").click()
    edited_reply = wait_reply(page, server, before, lambda c: user_texts(c) == ["edited question"])
    assert said(page) == ["edited question"]
    assert nav_counts(page) == ["2 / 2"]   # the message's versions; its new reply has one
    expect(page.locator(USER_NAV).locator(".nav-count")).to_have_text("2 / 2")

    # ‹ brings back the original message with the reply shown there before
    page.locator(USER_NAV).locator(PREVIOUS).click()
    wait_chat(page, lambda: said(page) == ["first question"] and replies(page) == [first_reply], STORE_WAIT,
              "the original message and its reply back")
    assert nav_counts(page) == ["1 / 2", "1 / 2"]   # the message's versions, then its reply's

    # the conversation continues from the branch shown
    set_seed(page, 44)
    follow_reply = exchange(page, server, "follow-up question")
    assert said(page) == ["first question", "follow-up question"]
    assert replies(page) == [first_reply, follow_reply]
    assert [role for role, _ in chat(page)] == ["user", "bot", "bot", "user", "bot", "bot"]   # each reply, its marker

    # both versions are still there after a reload
    wait_stored(page, lambda c: user_texts(c) == ["first question", "follow-up question"], "the branch shown")
    reload(page)
    assert said(page) == ["first question", "follow-up question"] and replies(page) == [first_reply, follow_reply]
    # the server holds the reloaded conversation too (the meter measures its history); on a loaded machine it
    # has been seen to hold an empty one instead (see the report: then the version links do nothing)
    wait_until(lambda: (meter(page) or {}).get("history", 0) > 0, STORE_WAIT,
               "the meter to count the reloaded conversation's history")
    page.locator(USER_NAV).locator(NEXT).click()
    wait_chat(page, lambda: said(page) == ["edited question"] and replies(page) == [edited_reply], STORE_WAIT,
              "the edited version after the reload")
    page.locator(USER_NAV).locator(PREVIOUS).click()
    wait_chat(page, lambda: said(page) == ["first question", "follow-up question"], STORE_WAIT,
              "the original version after the reload")
    page.locator(REPLY_NAV).locator(NEXT).click()   # the retried reply is still there too
    wait_chat(page, lambda: replies(page) == [retried], STORE_WAIT, "the retried reply after the reload")
    expect(page.locator(REPLY_NAV).locator(".nav-count")).to_have_text("2 / 2")
    page.locator(REPLY_NAV).locator(PREVIOUS).click()
    wait_chat(page, lambda: said(page) == ["first question", "follow-up question"]
              and replies(page) == [first_reply, follow_reply], STORE_WAIT, "the branch with the follow-up")

    # Markdown: the branch shown only; JSON: every version
    markdown = download(page, "#download-md")
    assert "first question" in markdown and "follow-up question" in markdown
    assert "edited question" not in markdown
    tree = json.loads(download(page, "#download-json"))
    contents = [as_shown(m["content"]) for node in tree["nodes"] for m in node["messages"]]
    for text in ("first question", "edited question", "follow-up question", first_reply, retried, edited_reply,
                 follow_reply):
        assert text in contents, f"{text!r} is not in the JSON download"


# -- 4. share links -------------------------------------------------------------------------------------------

def test_a_share_link_opens_read_only_and_replays_and_a_tampered_one_fails(visit, server):
    page = visit().page
    set_seed(page, 1234)
    exchange(page, server, "share this one")
    exchange(page, server, "and this too", max_new_tokens=None)
    shown = chat(page)
    page.locator("#share").click()
    expect(page.locator(SHARE_LINK)).to_have_value(re.compile(r"#share=1\.[A-Za-z0-9_-]+$"))
    link = page.locator(SHARE_LINK).input_value()
    assert link.startswith(server.url)

    # a fresh browser (no storage): the same messages, read-only, and Replay gives the same reply
    reader = visit(url=link).page
    expect(reader.locator("#share-banner")).to_be_visible()
    expect(reader.locator("#share-banner")).to_contain_text("seed 1234")
    wait_chat(reader, lambda: chat(reader) == shown, STORE_WAIT, "the shared messages")
    expect(reader.locator(TEXTAREA)).to_be_hidden()
    expect(reader.locator("#continue-shared")).to_be_visible()
    assert reader.evaluate("() => Object.keys(localStorage).filter(k => k.startsWith('chatglm-web:'))") == []
    before = finished_total(server)
    reader.locator("#replay").click()
    expect(reader.locator("#replay-result")).to_contain_text(
        STRINGS["replay_same"][0].format(seed=1234), timeout=REPLY_WAIT * 1000)
    assert finished_total(server) == before + 1   # it was generated again, not copied

    # a link changed by one character: an error instead of a conversation, and the page still works
    token = link.split("#share=", 1)[1]
    middle = len(token) // 2
    tampered = link[:len(link) - len(token)] + token[:middle] + ("A" if token[middle] != "A" else "B") \
        + token[middle + 1:]
    visitor = visit(url=tampered).page
    expect(visitor.locator(STATS)).to_contain_text("This share link cannot be opened", timeout=STORE_WAIT * 1000)
    expect(visitor.locator("#share-banner")).to_be_hidden()
    expect(visitor.locator(TEXTAREA)).to_be_editable()
    assert chat(visitor) == []
    exchange(visitor, server, "still works")
    assert said(visitor) == ["still works"]


# -- 5. the meter and the exact prompt ----------------------------------------------------------------------

def test_the_meter_counts_what_the_reply_is_prompted_with(visit, server):
    page = visit().page
    exchange(page, server, "some history first")   # a conversation with history, and the default system prompt
    expect(page.locator("#token-meter")).to_contain_text(" · new 0")
    page.locator("#view-prompt").click()   # the drawer with the exact prompt
    prompt, box = page.locator("#prompt-text"), page.locator(TEXTAREA)

    # as one types, the meter and the prompt follow (a measurement that holds the typed text was made after
    # the reply had ended, so it counts the whole history)
    box.click()
    box.press_sequentially("how many tokens", delay=15)
    expect(prompt).to_contain_text("<|user|>")
    expect(prompt).to_contain_text("how many tokens")
    first = meter(page)
    assert first is not None and first["new"] > 0, page.locator("#token-meter").inner_text()
    typed = "how many tokens are in these words"
    box.press_sequentially(typed[len("how many tokens"):], delay=15)
    expect(prompt).to_contain_text(typed)
    counted = meter(page)
    assert counted["new"] > first["new"] and counted["total"] > first["total"]
    assert counted["system"] == first["system"] > 0 and counted["history"] == first["history"] > 0
    assert counted["context"] == server.backend.info.context_length
    assert counted["total"] >= counted["system"] + counted["history"] + counted["new"]
    assert prompt.inner_text().index("some history first") < prompt.inner_text().index(typed)

    # the total is what the reply is prompted with
    before = finished_total(server)
    box.press("Enter")
    wait_reply(page, server, before)
    expect(page.locator(STATS)).to_contain_text("tokens/s")
    prompt_tokens = re.search(r"prompt ([\d,]+) tokens", page.locator(STATS).inner_text())
    assert prompt_tokens is not None, page.locator(STATS).inner_text()
    assert int(prompt_tokens.group(1).replace(",", "")) == counted["total"]


# -- 6. the conversation an older version kept --------------------------------------------------------------

LEGACY_HISTORY = [{"role": "user", "content": "legacy question"}, {"role": "assistant", "content": "legacy answer"},
                  marker("length", "en")]


def legacy_stored_value(browser) -> str:
    """What the version before the list kept: its history in a ``gr.BrowserState`` under ``STORAGE_KEY``,
    encrypted by Gradio's front end with the state secret. Made here by Gradio itself, in a one-component app
    with that same BrowserState, served on another port (BrowserState's value does not depend on the origin)."""
    with gr.Blocks(analytics_enabled=False) as legacy:
        kept = gr.BrowserState(None, storage_key=STORAGE_KEY, secret=SECRET)
        gr.Button("keep", elem_id="keep").click(lambda: LEGACY_HISTORY, None, [kept])
    legacy.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(legacy.local_url)
        page.locator("#keep").click()
        page.wait_for_function("key => localStorage.getItem(key)", arg=STORAGE_KEY, timeout=STORE_WAIT * 1000)
        return page.evaluate("key => localStorage.getItem(key)", STORAGE_KEY)
    finally:
        context.close()
        legacy.close()


def test_a_conversation_kept_by_the_previous_version_joins_the_list_once(browser, server):
    value = legacy_stored_value(browser)
    context = browser.new_context(viewport={"width": 1280, "height": 900}, storage_state={
        "cookies": [], "origins": [{"origin": server.url.rstrip("/"),
                                    "localStorage": [{"name": STORAGE_KEY, "value": value}]}]})
    errors = []
    try:
        page = open_tab(context, server)
        page.on("pageerror", lambda error: errors.append(str(error)))
        expect_titles(page, {"legacy question"}, "after the first load")
        assert chat(page) == [("user", "legacy question"), ("bot", "legacy answer"), ("bot", CUT_OFF)]
        wait_stored(page, lambda c: user_texts(c) == ["legacy question"] and c.last().end == "length",
                    "the moved conversation")
        wait_until(lambda: stored_titles(page) == ["legacy question"], STORE_WAIT, "one stored conversation")

        # moved once: neither a reload nor another tab moves it again
        reload(page)
        assert chat(page) == [("user", "legacy question"), ("bot", "legacy answer"), ("bot", CUT_OFF)]
        expect_titles(page, {"legacy question"}, "after a reload")
        other = open_tab(context, server)
        other.on("pageerror", lambda error: errors.append(str(error)))
        assert said(other) == []   # a new tab starts a new conversation
        reload(other)
        reload(page)
        assert stored_titles(page) == ["legacy question"], "the old conversation was moved into the list again"
        expect_titles(page, {"legacy question"}, "after another reload")
    finally:
        context.close()
    assert errors == []


# -- 7. export all, import in another browser -----------------------------------------------------------------

def test_export_all_then_import_in_a_fresh_browser(visit, server):
    page = visit().page
    alpha = exchange(page, server, "export alpha")
    page.locator("#new-chat").click()
    wait_chat(page, lambda: chat(page) == [], STORE_WAIT, "the chat to be empty after New")
    beta = exchange(page, server, "export beta")
    expect_titles(page, {"export alpha", "export beta"}, "before the export")

    with page.expect_download() as info:
        page.locator("#export-all").click()
    path = info.value.path()
    exported = json.loads(path.read_text(encoding="utf-8"))
    assert exported["format"] == EXPORT_FORMAT
    assert sorted(c["title"] for c in exported["conversations"]) == ["export alpha", "export beta"]

    other = visit().page
    expect(other.locator(LIST)).to_have_count(0)
    with other.expect_file_chooser() as chooser:
        other.locator("#import").click()
    chooser.value.set_files(path)
    expect_titles(other, {"export alpha", "export beta"}, "after the import")
    expect(other.locator("#list-note")).to_contain_text(STRINGS["imported"][0].format(count=2))
    assert chat(other) == []   # the import does not replace what the tab shows
    choose(other, "export alpha")
    wait_chat(other, lambda: said(other) == ["export alpha"] and replies(other) == [alpha], STORE_WAIT,
              "the imported alpha conversation")
    choose(other, "export beta")
    wait_chat(other, lambda: said(other) == ["export beta"] and replies(other) == [beta], STORE_WAIT,
              "the imported beta conversation")
    wait_until(lambda: sorted(stored_titles(other)) == ["export alpha", "export beta"], STORE_WAIT,
               "the imported conversations kept in the browser")
    reload(other)
    expect_titles(other, {"export alpha", "export beta"}, "the imported conversations after a reload")
