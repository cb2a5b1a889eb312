"""The real page in headless Chromium against the real server (tiny random ChatGLM3 on loopback).

Covers what only a browser exercises: the page loads and works without any outside host,
a reply streams into the chat bubble, Stop cancels the generation on the server and marks the
reply stopped, the Chatbot's Retry (a new version beside the old one) / Undo / Clear (a new
conversation; the old one stays in the list) buttons, the conversations kept in browser storage
(also across a server restart; an entry the page cannot open is left alone), the page staying usable
after an error (shown once, in the statistics line), Stop while waiting for a slot, the settings
drawer, and HTML in a message staying inside its bubble.

Selectors and helpers: ``browser_harness.py``. The replies are random characters; only their growth,
length and identity are checked.
"""

from __future__ import annotations

import re

import pytest
from gradio_client import Client
from playwright.sync_api import expect

from browser_harness import (CLEAR, CONVERSATION_LIST, CONVERSATION_PREFIX, CUT_OFF, DELETE, DRAWER,  # noqa: F401
                             MAX_NEW_TOKENS, MESSAGES, META_PREFIX, OPEN_SETTINGS, RETRY, SEND, SIDEBAR, STATS, STOP,
                             STOPPED, STORAGE_KEY, TAB_KEY, TEXTAREA, TOAST, UNDO, UNDO_DELETE, VERSION_NAV, Session,
                             browser, chat_prompt, chosen, expect_idle, finished_total, inside, listed, messages,
                             open_settings, pick_conversation, record_prompts, reload, replies, saved_conversation,
                             send, session, set_max_new_tokens, set_seed, set_textarea_with_unpaired_surrogate,
                             short_exchange, stored_conversations, streamed_snapshots, tab_conversation,
                             wait_for_replies, wait_for_saved_conversation, wait_until, without_version_navs)
from chatglm_web.page.strings import STRINGS
from server_harness import free_port, requests_ended, running_server

pytestmark = pytest.mark.browser

EMPTY_CHAT = STRINGS["empty_chat"][0]  # the empty chat's placeholder


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


# -- tests --------------------------------------------------------------------------------------

def test_stream_stop_retry_undo(session, server):
    page = session.page
    name = str(server.backend.info.name)
    expect(page.locator("#model-title h1")).to_have_text(name.rstrip("/").split("/")[-1])  # the top bar
    expect(page.locator("#model-details")).to_contain_text(name)  # and in full in the drawer
    expect(page.locator(MESSAGES)).to_have_count(0)

    # 1. A long reply streams into the bubble: several growing snapshots, each a prefix of the next.
    set_max_new_tokens(page, 4096)
    cancelled_before = requests_ended(server, "cancelled")
    send(page, "Tell me a long story")
    expect(page.locator(STOP)).to_be_visible()
    expect(page.locator(SEND)).to_be_hidden()  # exactly one of them
    expect(page.locator('#chatbot [data-testid="bot"]')).to_have_count(1)
    snapshots = streamed_snapshots(page)
    assert server.engine.load[0] == 1, "the reply should still be generating when Stop is pressed"

    # 2. Stop: the server cancels the generation, the engine drains, and the partial reply is marked stopped
    #    (a message of its own, in italics) as the reply's last update; the turn is over (Send is back).
    page.locator(STOP).dispatch_event("click")   # (the button itself: the streaming chat keeps re-laying the page out)
    wait_until(lambda: requests_ended(server, "cancelled") > cancelled_before, 30, "a cancellation on the server")
    wait_until(lambda: server.engine.load == (0, 0), 30, "engine.load to return to (0, 0)")
    expect_idle(page)
    wait_until(lambda: messages(page, "bot")[-1:] == [STOPPED], 30, "the stopped marker under the reply")
    bots = messages(page, "bot")
    assert len(bots) == 2, bots
    stopped = bots[0]
    assert stopped.startswith(snapshots[-1])
    expect(page.locator('#chatbot [data-testid="bot"]').last.locator("em")).to_have_text(STOPPED.strip("_"))
    assert messages(page, "user") == ["Tell me a long story"]

    # 3. A second, short message completes with a statistics line; it is cut at max-new-tokens and says so.
    #    The stopped reply is as it was when Stop came (nothing arrived after it) and is still marked stopped.
    short_exchange(page, server, "Short one", max_new_tokens=8)
    assert messages(page, "user") == ["Tell me a long story", "Short one"]
    bots = messages(page, "bot")
    assert bots[:2] == [stopped, STOPPED], f"the stopped reply changed or lost its marker: {bots}"
    assert len(bots) == 4 and bots[3] == CUT_OFF and bots[2] not in (STOPPED, CUT_OFF), bots
    second_reply = bots[2]
    expect(page.locator(STATS)).to_contain_text("reply 8 tokens")

    # 4. Retry: the last answer is generated again (seed -1: a different text) as a second version beside the
    #    first, which the version links bring back; nothing else changes.
    before = finished_total(server)
    expect(page.locator(RETRY)).to_have_count(1)
    page.locator(RETRY).click()
    expect(page.locator(STOP)).to_be_visible()  # Stop shows for a retried reply too
    wait_for_replies(page, server, before)
    expect(page.locator(f"{VERSION_NAV} .nav-count")).to_have_text("2 / 2")
    wait_until(lambda: without_version_navs(messages(page, "bot"))[-2:-1] != [second_reply], 5,
               "the retried reply in place of the old one")
    assert messages(page, "user") == ["Tell me a long story", "Short one"]
    bots = without_version_navs(messages(page, "bot"))
    assert len(bots) == 4 and bots[:2] == [stopped, STOPPED] and bots[3] == CUT_OFF, bots
    retried = bots[2]
    assert retried and retried not in (second_reply, STOPPED, CUT_OFF)
    expect(page.locator(STATS)).to_contain_text("reply 8 tokens")
    page.locator(f"{VERSION_NAV} a").click()   # ‹ : the first version again
    expect(page.locator(f"{VERSION_NAV} .nav-count")).to_have_text("1 / 2")
    wait_until(lambda: without_version_navs(messages(page, "bot")) == [stopped, STOPPED, second_reply, CUT_OFF], 5,
               "the first version of the reply")
    page.locator(f"{VERSION_NAV} a").click()   # › : back to the retried one
    expect(page.locator(f"{VERSION_NAV} .nav-count")).to_have_text("2 / 2")
    wait_until(lambda: without_version_navs(messages(page, "bot")) == [stopped, STOPPED, retried, CUT_OFF], 5,
               "the retried version of the reply")

    # 5. Undo: the last exchange disappears and its question goes back into the input box.
    page.locator(UNDO).click()
    expect(page.locator('#chatbot [data-testid="user"]')).to_have_count(1)
    expect(page.locator(TEXTAREA)).to_have_value("Short one")
    assert messages(page, "user") == ["Tell me a long story"]
    assert messages(page, "bot") == [stopped, STOPPED]

    # ... and can be sent again from there.
    before = finished_total(server)
    page.locator(TEXTAREA).press("Enter")
    wait_for_replies(page, server, before)
    wait_until(lambda: messages(page, "bot")[-1:] == [CUT_OFF], 5, "the cut-off marker under the reply")
    assert messages(page, "user") == ["Tell me a long story", "Short one"]
    bots = messages(page, "bot")
    assert len(bots) == 4 and bots[:2] == [stopped, STOPPED], bots
    expect(page.locator(TEXTAREA)).to_have_value("")

    session.assert_air_gapped()


def test_clear_starts_an_empty_conversation_and_delete_forgets_the_old_one(session, server):
    """Clear (the chat's trash button) starts a new, empty conversation, which stays empty after a reload; the
    earlier one stays in the list until Delete forgets it for good: gone from the list and from the browser's
    storage, also after a reload."""
    page = session.page
    short_exchange(page, server, "Remember me?", max_new_tokens=6)
    wait_for_saved_conversation(page, previous="")
    old = tab_conversation(page)
    assert old in stored_conversations(page)
    wait_until(lambda: listed(page) == ["Remember me?"] and chosen(page) == "Remember me?", 10, "the list to show it")
    page.locator(CLEAR).click()
    expect(page.locator(MESSAGES)).to_have_count(0)
    wait_until(lambda: tab_conversation(page) not in (None, old), 10, "the tab to show a new conversation")
    expect(page.locator(f"{CONVERSATION_LIST} label.selected")).to_have_count(0)
    assert listed(page) == ["Remember me?"]
    reload(page)
    expect(page.locator("#chatbot")).to_contain_text(EMPTY_CHAT)  # shown only while the chat is empty
    assert messages(page, "user") == [] and messages(page, "bot") == []
    assert old in stored_conversations(page)
    assert listed(page) == ["Remember me?"] and chosen(page) is None, "a reload lost the list"

    pick_conversation(page, "Remember me?")
    wait_until(lambda: messages(page, "user") == ["Remember me?"], 10, "the earlier conversation to show")
    expect(page.locator(UNDO_DELETE)).to_be_hidden()
    page.locator(DELETE).click()
    expect(page.locator(MESSAGES)).to_have_count(0)
    expect(page.locator(UNDO_DELETE)).to_be_visible()  # Delete can be taken back until the next one
    wait_until(lambda: old not in stored_conversations(page), 10, "the entry to be removed from localStorage")
    expect(page.locator(f"{CONVERSATION_LIST} label")).to_have_count(0)
    reload(page)
    assert listed(page) == [] and messages(page, "user") == [], "Delete did not forget the conversation"
    expect(page.locator(UNDO_DELETE)).to_be_hidden()
    session.assert_air_gapped()


def test_conversation_is_restored_after_reload(session, server):
    page = session.page
    short_exchange(page, server, "First question", max_new_tokens=6)
    before_second = saved_conversation(page)
    short_exchange(page, server, "Second question", max_new_tokens=6)
    users, bots = messages(page, "user"), messages(page, "bot")
    assert users == ["First question", "Second question"] and len(replies(bots)) == 2 and bots[-1] == CUT_OFF
    wait_for_saved_conversation(page, previous=before_second)
    tab = tab_conversation(page)
    reload(page)
    assert messages(page, "user") == users, "the conversation was not restored from browser storage"
    assert messages(page, "bot") == bots, "the replies came back different from what was shown"
    assert tab_conversation(page) == tab
    wait_until(lambda: listed(page) == ["First question"] and chosen(page) == "First question", 10,
               "the list to show it, chosen")
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
    reload(page)
    assert messages(page, "user") == [] and messages(page, "bot") == [], "the undone exchange came back"
    session.assert_air_gapped()


def test_one_thing_is_called_settings_and_the_drawer_holds_the_settings(session):
    """One control on the page is called Settings (the top bar's button; Gradio's footer link is gone, and
    no accordion is called so); it opens the drawer on the right, which holds the mode, the system prompt,
    the sampling sliders, the seed and what the model sees. The downloads are with the conversation, in the
    list on the left (open beside the chat on this wide window)."""
    page = session.page
    expect(page.get_by_text(re.compile("Settings")).filter(visible=True)).to_have_count(1)
    expect(page.get_by_role("button", name=re.compile("settings", re.I))).to_have_count(1)
    expect(page.locator(OPEN_SETTINGS)).to_be_visible()
    expect(page.locator("footer").get_by_text(re.compile("settings", re.I))).to_have_count(0)
    expect(page.locator("button.label-wrap", has_text=re.compile("settings", re.I))).to_have_count(0)
    drawer = page.locator(DRAWER)
    expect(drawer).not_to_have_class(re.compile(r"\bopen\b"))  # the drawer starts closed, out of view
    expect(page.locator(MAX_NEW_TOKENS)).not_to_be_in_viewport()
    for selector in ("#download-md", "#download-json"):
        expect(page.locator(SIDEBAR).locator(selector)).to_be_in_viewport()
    open_settings(page)
    for selector in ("#mode", "#system-prompt textarea", "#temperature", "#top-p", "#max-new-tokens", "#top-k",
                     "#repetition-penalty", "#seed input", "#prompt-accordion"):
        expect(drawer.locator(selector)).to_be_visible()
        drawer.locator(selector).scroll_into_view_if_needed()
        expect(drawer.locator(selector)).to_be_in_viewport()
    box, viewport = drawer.bounding_box(), page.viewport_size
    assert box["x"] + box["width"] / 2 > viewport["width"] / 2, f"the drawer {box} is not on the right"
    box = page.locator(SIDEBAR).bounding_box()
    assert box["x"] + box["width"] / 2 < viewport["width"] / 2, f"the conversation list {box} is not on the left"
    session.assert_air_gapped()


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


def expect_refused(page, error: str, kept=None):
    """A refused message: the error once, in the statistics line (no toast, no error badge over the chat; the
    token meter under the box measures what is typed, and may say the same of it); the message still in the input
    box (``kept``: its value; None: checked by the caller); the chat as it was (empty here: its placeholder and
    examples still show); the page ready for the next message."""
    expect(page.locator(STATS)).to_contain_text("⚠️")
    expect(page.locator(STATS)).to_contain_text(error)
    outside_the_meter = "xpath=self::*[not(ancestor-or-self::*[@id='token-meter'])]"
    expect(page.get_by_text(error).locator(outside_the_meter)).to_have_count(1)
    expect(page.locator(TOAST)).to_have_count(0)
    expect(page.locator("#chatbot").get_by_text("Error", exact=True).filter(visible=True)).to_have_count(0)
    expect(page.locator("#chatbot").get_by_text(EMPTY_CHAT)).to_be_visible()
    expect_idle(page)
    if kept is not None:
        expect(page.locator(TEXTAREA)).to_have_value(kept)
    expect(page.locator(MESSAGES)).to_have_count(0)


def test_after_an_error_the_message_comes_back_and_the_next_one_streams(session, server, monkeypatch):
    page = session.page
    prompts = record_prompts(server, monkeypatch)

    # 1. A message longer than the context: the error is shown, the input box is usable and holds the message.
    too_long = "word " * 3000  # about 9000 tokens; the context leaves 7168 for the prompt
    send(page, too_long)
    expect_refused(page, "too long", too_long)

    # 2. An invalid value (seed -5): refused naming the option; the new message is given back too.
    set_seed(page, -5)
    send(page, "Short one")
    expect_refused(page, "seed must be", "Short one")

    # 3. A character that cannot be sent (an unpaired surrogate): refused, and the box keeps the text.
    set_textarea_with_unpaired_surrogate(page, "Short one")
    page.locator(TEXTAREA).press("Enter")
    expect_refused(page, "invalid character")
    assert page.locator(TEXTAREA).evaluate("box => box.value.length") == len("Short one") + 1
    assert prompts == [], "a refused message reached the model"

    # 4. With the seed fixed, the same page sends the next message and its reply streams in.
    set_seed(page, -1)
    set_max_new_tokens(page, 1000)  # long enough to be seen growing on a loaded machine, too
    before = finished_total(server)
    send(page, "Short one")
    streamed_snapshots(page, wanted=3)
    wait_for_replies(page, server, before)
    expect(page.locator(STATS)).to_contain_text("reply 1000 tokens")
    expect(page.locator(STATS)).not_to_contain_text("⚠️")
    wait_until(lambda: messages(page, "bot")[-1:] == [CUT_OFF], 5, "the cut-off marker under the reply")
    assert messages(page, "user") == ["Short one"] and len(messages(page, "bot")) == 2
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
            kept = stored_conversations(page)
        except BaseException:
            session.context.close()
            raise
    try:
        with running_server(model=str(long_reply_checkpoint), max_new_tokens=4096, port=port) as second:
            reload(page)
            assert messages(page, "user") == users, "the conversation was lost in the restart"
            assert messages(page, "bot") == bots
            assert set(stored_conversations(page)) == set(kept)
            wait_until(lambda: listed(page) == ["Remember me after a restart"], 10, "the list after the restart")

            # It goes on from there, and the download holds all of it, as shown (each reply and its marker).
            short_exchange(page, second, "And after it?", max_new_tokens=6)
            assert messages(page, "user") == users + ["And after it?"]
            shown = messages(page, "bot")
            assert len(replies(shown)) == 2
            with page.expect_download() as download:   # in the conversation list, open beside the chat
                page.locator("#download-md").click()
            text = open(download.value.path(), encoding="utf-8").read()
            assert download.value.suggested_filename == "conversation.md"
            assert "## User\n\nRemember me after a restart\n" in text and "## User\n\nAnd after it?\n" in text
            assert text.count("## Assistant") == len(shown), text
            assert text.count(f"## Assistant\n\n{CUT_OFF}\n") == shown.count(CUT_OFF) >= 1, text
            assert session.outside_requests() == []
    finally:
        session.context.close()


def test_a_stored_conversation_that_cannot_be_read_is_left_alone(session, server):
    """An entry sealed under another key (say CHATGLM_WEB_STATE_SECRET was changed), or damaged, or forged, as this
    tab's conversation, and the one conversation an earlier version kept under another key: the page starts a
    new conversation without an error, lists none of them, and overwrites none of them (going back to the old
    key brings them back), also once the new conversation is stored."""
    page = session.page
    foreign = "1." + "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJCrze8SNFZ4kKvN7xI0VniQ"   # sealed, by another key
    legacy = "AAAAAAAAAAAAAAAAAAAAAA==:" + "q83vEjRWeJCrze8SNFZ4kKvN7xI0VniQq83vEjRWeJA="   # iv:ciphertext, other key
    planted = {CONVERSATION_PREFIX + "cforeign": foreign, META_PREFIX + "cforeign": foreign,
               CONVERSATION_PREFIX + "cdamaged": foreign[:-7], META_PREFIX + "cdamaged": "{not sealed}",
               STORAGE_KEY: legacy}
    page.evaluate("(entries) => { for (const [k, v] of Object.entries(entries)) localStorage.setItem(k, v); }", planted)
    for tab in ("cforeign", "cdamaged"):
        page.evaluate("([key, tab]) => sessionStorage.setItem(key, tab)", [TAB_KEY, tab])
        reload(page)  # the load event found nothing readable and has come back
        assert messages(page, "user") == [] and messages(page, "bot") == []
        expect(page.locator(STATS)).not_to_contain_text("⚠️")
        assert listed(page) == []
        wait_until(lambda: tab_conversation(page) not in (None, "cforeign", "cdamaged"), 10,
                   "the tab to start a new conversation")
    short_exchange(page, server, "A new conversation", max_new_tokens=4)
    wait_for_saved_conversation(page, previous="")
    assert listed(page) == ["A new conversation"]
    kept = page.evaluate("(keys) => Object.fromEntries(keys.map(k => [k, localStorage.getItem(k)]))", list(planted))
    assert kept == planted, "an entry the page could not read was overwritten"
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

        cancelled = requests_ended(server, "cancelled")
        send(page, "I will wait")
        expect(page.locator(f'{STATS}, #chatbot [data-testid="bot"]', has_text="Waiting for a free slot")).to_have_count(1)
        assert not any("⏳" in text for text in messages(page, "bot")), "the waiting line is shown as a reply"
        expect(page.locator(STATS)).to_contain_text("Waiting for a free slot")
        page.locator(STOP).dispatch_event("click")   # (the button itself: the streaming chat keeps re-laying the page out)
        wait_until(lambda: requests_ended(server, "cancelled") > cancelled and server.engine.load == (1, 0), 30,
                   "the waiting request to be cancelled (and only the other user's left)")
        expect_idle(page)
        expect(page.locator(STATS)).not_to_contain_text("Waiting")
        # no reply came: the stopped marker is all there is to say so
        wait_until(lambda: messages(page, "bot") == [STOPPED], 30, "the stopped marker")
        assert messages(page, "user") == ["I will wait"]

        other_user.cancel()
        wait_until(lambda: server.engine.load == (0, 0), 30, "the slot to be free")
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
    for selector in (TEXTAREA, SEND, "#model-title h1", OPEN_SETTINGS):  # the rest of the page is not covered
        page.locator(selector).scroll_into_view_if_needed()
        target = page.locator(selector).bounding_box()
        x, y = target["x"] + target["width"] / 2, target["y"] + target["height"] / 2
        assert page.evaluate("([x, y]) => !document.elementFromPoint(x, y).closest('#cover')", [x, y]), selector
    session.assert_air_gapped()
