"""The page as a visitor and a presenter meet it (issue 18), in Debian's Chromium at 1280×800 and 390×844,
in English and under zh-CN, in light and dark mode, against the real server (tiny ChatGLM3 whose replies
run to max_new_tokens, so a reply streams as long as a test needs).

Also here, without a browser: the page's code uses no private Gradio name.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
from playwright.sync_api import expect

from browser_harness import (CLEAR, CONVERSATION_LIST, EDIT, MESSAGES, SEND, STATS, STOP, TEXTAREA,  # noqa: F401
                             UNDO, VERSION_NAV, Session, browser, chosen, expect_idle, finished_total, listed,
                             messages, open_settings, pick_conversation, reload, replies, saved_conversation, send,
                             set_max_new_tokens, set_seed, settle, tab_conversation, wait_for_saved_conversation,
                             unhurried_replies, wait_until, without_version_navs)
from chatglm_web.page import SETTINGS_KEY
from server_harness import running_server

REPO = Path(__file__).resolve().parents[1]
VIEWS = {"desktop": (1280, 800), "phone": (390, 844)}
LOCALES = {"en": "en-US", "zh": "zh-CN"}


@pytest.fixture(scope="module")
def app_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CHATGLM_WEB_CACHE", str(tmp_path_factory.mktemp("app-cache")))
        env.delenv("CHATGLM_WEB_STATE_SECRET", raising=False)
        yield


@pytest.fixture(scope="module")
def server(long_reply_checkpoint, app_cache):
    with running_server(model=str(long_reply_checkpoint), max_new_tokens=4096) as srv:
        yield srv


@pytest.fixture
def visit(browser, server):
    sessions = []

    def open_page(view: str = "desktop", lang: str = "en", scheme: str = "light") -> Session:
        width, height = VIEWS[view]
        session = Session(browser, server, width=width, height=height, locale=LOCALES[lang], color_scheme=scheme)
        sessions.append(session)
        session.open()
        settle(session.page)
        return session

    yield open_page
    for session in sessions:
        session.assert_air_gapped()   # no request ever left the loopback server, no uncaught error
        session.context.close()


def stored_settings(page) -> str:
    """The settings as gr.BrowserState stored them (encrypted: only changes tell)."""
    return page.evaluate("key => localStorage.getItem(key)", SETTINGS_KEY) or ""


def start_long_reply(page, server, text: str = "a long one"):
    """Send ``text`` with a 4000-token budget and wait until the reply is streaming."""
    set_max_new_tokens(page, 4000)
    send(page, text)
    expect(page.locator(STOP)).to_be_visible()
    wait_until(lambda: messages(page, "bot") and len(messages(page, "bot")[-1]) > 5, 60, "the reply to stream")


def short_reply(page, server, text: str):
    set_max_new_tokens(page, 8)
    before = finished_total(server)
    send(page, text)
    wait_until(lambda: finished_total(server) > before, 60, "the reply to finish")
    expect_idle(page)


# -- chat first --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("lang", LOCALES)
def test_the_input_is_in_view_and_focused_after_loading(visit, view, lang):
    page = visit(view, lang).page
    box = page.locator(TEXTAREA)
    expect(box).to_be_focused()
    rect = box.bounding_box()
    width, height = VIEWS[view]
    assert 0 <= rect["y"] and rect["y"] + rect["height"] <= height and rect["x"] + rect["width"] <= width, rect
    # one scroll: the page is the viewport, only the chat scrolls
    assert page.evaluate("() => document.scrollingElement.scrollHeight <= innerHeight + 1")
    page.keyboard.type("typed at once")
    expect(box).to_have_value("typed at once")


def test_the_input_is_within_three_tabs_from_the_top(visit):
    page = visit().page
    page.locator("#model-title h1").click()   # the top of the page; nothing there takes focus
    for _ in range(3):
        page.keyboard.press("Tab")
        if page.evaluate("() => document.activeElement === document.querySelector('#chat-input textarea')"):
            return
    raise AssertionError("the message box is not reached within 3 Tabs from the top")


def test_the_title_names_the_model_that_answers(visit, server):
    page = visit().page
    name = server.backend.info.name.rstrip("/").split("/")[-1]
    expect(page.locator("#model-title h1")).to_have_text(name)
    expect(page.locator("#model-title")).to_contain_text(f"{server.backend.info.context_length:,}")
    expect(page.locator("#banner")).to_be_hidden()   # ChatGLM3 itself answers: no demo banner
    assert page.title().startswith(name)


# -- turn controls that cannot lie -------------------------------------------------------------------------

def test_an_edited_turn_shows_stop_and_can_be_stopped(visit, server):
    page = visit().page
    short_reply(page, server, "first version")
    set_max_new_tokens(page, 4000)
    page.locator(EDIT).first.click()
    page.locator("#chatbot textarea").fill("second version")
    page.get_by_role("button", name="Submit").click()
    expect(page.locator(STOP)).to_be_visible()
    expect(page.locator(SEND)).to_be_hidden()
    wait_until(lambda: without_version_navs(messages(page, "user")) == ["second version"]
               and replies(messages(page, "bot")), 60, "the edited turn's reply")
    expect(page.locator(f"{VERSION_NAV} .nav-count")).to_have_text("2 / 2")   # the first version is kept
    page.locator(STOP).dispatch_event("click")   # (the button itself: the streaming chat keeps re-laying the page out)
    expect_idle(page)
    expect(page.locator("#chatbot")).to_contain_text("⏹ Stopped")


def test_undo_retry_and_edit_do_nothing_while_a_reply_streams(visit, server, unhurried_replies):
    page = visit().page
    short_reply(page, server, "earlier")
    start_long_reply(page, server, "streaming now")
    controls = page.locator(f'{UNDO}, #chatbot button[aria-label="Retry"], {EDIT}')
    assert controls.count() > 0   # at least the Edit of each user message
    for i in range(controls.count()):
        assert controls.nth(i).evaluate("b => getComputedStyle(b).pointerEvents") == "none"
    # (that the server refuses them too while busy: test_ui's test_turn_controls_are_refused_while_busy)
    page.locator(STOP).dispatch_event("click")   # (the button itself: the streaming chat keeps re-laying the page out)
    expect_idle(page)
    for i in range(controls.count()):
        assert controls.nth(i).evaluate("b => getComputedStyle(b).pointerEvents") != "none"


def test_a_stopped_reply_is_still_marked_after_a_reload(visit, server, unhurried_replies):
    page = visit().page
    start_long_reply(page, server)
    page.locator(STOP).dispatch_event("click")   # (the button itself: the streaming chat keeps re-laying the page out)
    expect_idle(page)
    expect(page.locator("#chatbot")).to_contain_text("⏹ Stopped")
    wait_until(lambda: "⏹" in "".join(messages(page, "bot")), 10, "the marker")
    stored = saved_conversation(page)
    wait_until(lambda: saved_conversation(page) != "" and saved_conversation(page) == stored, 10, "storage to settle")
    page.reload()
    expect(page.locator(TEXTAREA)).to_be_editable()
    expect(page.locator("#chatbot")).to_contain_text("⏹ Stopped")
    assert messages(page, "user") == ["a long one"]


def test_a_reload_mid_reply_keeps_the_partial_reply_marked_interrupted(visit, server, unhurried_replies):
    page = visit().page
    start_long_reply(page, server)
    # kept when the turn began (an empty reply), then after each change of the chat: two changes after the reply
    # was seen growing, and the entry holds some of it (the reply is unhurried: it is still streaming then)
    seen = [saved_conversation(page)]

    def stored_again() -> bool:
        if saved_conversation(page) != seen[-1]:
            seen.append(saved_conversation(page))
        return len(seen) >= 3

    wait_until(stored_again, 30, "the partial reply to be stored")
    shown = replies(messages(page, "bot"))[-1]
    expect(page.locator(STOP)).to_be_visible(timeout=1)  # still streaming: the reload interrupts it
    page.reload()
    expect(page.locator(TEXTAREA)).to_be_editable()
    expect(page.locator("#chatbot")).to_contain_text("⚠ Interrupted")
    expect(page.locator(SEND)).to_be_visible()
    [kept] = replies(messages(page, "bot"))
    assert kept and (kept.startswith(shown) or shown.startswith(kept)), "the partial reply was not kept"


def test_a_reply_cut_at_max_new_tokens_is_marked(visit, server):
    page = visit().page
    short_reply(page, server, "short budget")
    expect(page.locator("#chatbot")).to_contain_text("✂ Cut off at the max-new-tokens limit")


def test_clear_starts_a_new_conversation_and_the_old_one_stays_in_the_list(visit, server):
    """Clear takes nothing away for good: the cleared conversation is in the list, and choosing it brings it
    back, also after a reload."""
    page = visit().page
    short_reply(page, server, "keep me")
    wait_for_saved_conversation(page, previous="")
    kept = tab_conversation(page)
    page.locator(CLEAR).click()
    expect(page.locator(MESSAGES)).to_have_count(0)
    expect(page.locator(f"{CONVERSATION_LIST} label.selected")).to_have_count(0)
    assert listed(page) == ["keep me"]
    short_reply(page, server, "a new one")
    wait_until(lambda: listed(page) == ["a new one", "keep me"], 10, "both conversations in the list")
    assert tab_conversation(page) != kept
    pick_conversation(page, "keep me")
    wait_until(lambda: messages(page, "user") == ["keep me"], 10, "the conversation to come back")
    wait_until(lambda: tab_conversation(page) == kept, 10, "the tab to show it again")
    reload(page)
    wait_until(lambda: messages(page, "user") == ["keep me"], 10, "the restored conversation after a reload")
    assert chosen(page) == "keep me"


def test_an_error_shows_once_in_the_statistics_line(visit, server):
    page = visit().page
    page.locator(TEXTAREA).fill("   ")
    page.locator(SEND).click()
    expect(page.locator(STATS)).to_contain_text("Type a message first.")
    expect(page.locator(STATS)).to_have_text(re.compile(r"^\s*⚠️ Type a message first\.\s*$"))   # once
    expect(page.locator(".toast-body")).to_have_count(0)
    expect(page.locator(MESSAGES)).to_have_count(0)


# -- the visitor's language ----------------------------------------------------------------------------------

def test_under_zh_cn_the_apps_labels_are_chinese(visit, server):
    page = visit("desktop", "zh").page
    expect(page.locator(SEND)).to_have_text("发送")
    expect(page.locator("#open-settings")).to_contain_text("设置")
    expect(page.locator(TEXTAREA)).to_have_attribute("placeholder", re.compile("发消息"))
    expect(page.locator("#chatbot")).to_contain_text("你好，请介绍一下你自己。")   # the examples, in Chinese
    expect(page.locator("#chatbot")).not_to_contain_text("What is the capital of France?")
    open_settings(page)
    expect(page.locator("#max-new-tokens")).to_contain_text("最大生成长度")
    expect(page.locator("#settings-drawer")).to_contain_text("随机种子")
    short_reply(page, server, "你好")
    expect(page.locator(STATS)).to_contain_text("tokens/秒")
    expect(page.locator("#chatbot")).to_contain_text("达到最大生成长度")


def test_the_language_switch_and_the_settings_survive_a_reload(visit, server):
    page = visit("desktop", "en").page
    page.locator("#language-switch").click()
    expect(page.locator(SEND)).to_have_text("发送")
    set_seed(page, 1234)
    set_max_new_tokens(page, 77)
    before = stored_settings(page)
    page.locator("#system-prompt textarea").fill("Answer like a pirate.")
    wait_until(lambda: stored_settings(page) != before, 10, "the settings to be stored")
    page.reload()
    expect(page.locator(SEND)).to_have_text("发送")
    open_settings(page)
    expect(page.locator("#seed input")).to_have_value("1234")
    expect(page.locator('#max-new-tokens input[type="range"]')).to_have_value("77")
    expect(page.locator("#system-prompt textarea")).to_have_value("Answer like a pirate.")
    page.locator("#language-switch").click()
    expect(page.locator(SEND)).to_have_text("Send")


# -- accessibility -------------------------------------------------------------------------------------------

CONTRAST_JS = r"""() => {
  const parse = (c) => {
    const m = c && c.match(/rgba?\(([^)]+)\)/);
    if (!m) return null;
    const p = m[1].split(/[\s,\/]+/).filter(Boolean).map(Number);
    return {r: p[0], g: p[1], b: p[2], a: p.length > 3 ? p[3] : 1};
  };
  const over = (top, under) => ({r: top.r * top.a + under.r * (1 - top.a), g: top.g * top.a + under.g * (1 - top.a),
                                 b: top.b * top.a + under.b * (1 - top.a), a: 1});
  const lum = ({r, g, b}) => [r, g, b].map(v => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; })
                                       .reduce((s, v, i) => s + v * [0.2126, 0.7152, 0.0722][i], 0);
  const ratio = (a, b) => { const [x, y] = [lum(a), lum(b)].sort((p, q) => q - p); return (x + 0.05) / (y + 0.05); };
  const backgrounds = (el) => {   // candidate backgrounds under el: its layers composed; gradients give each stop
    const layers = [];
    for (let e = el; e; e = e.parentElement) {
      const style = getComputedStyle(e);
      const stops = (style.backgroundImage.match(/rgba?\([^)]+\)/g) || []).map(parse);
      const color = parse(style.backgroundColor);
      if (stops.length) { layers.push(stops); if (stops.every(s => s.a === 1)) break; }
      if (color && color.a > 0) { layers.push([color]); if (color.a === 1) break; }
    }
    let result = [document.documentElement.matches('.dark') ? {r: 0, g: 0, b: 0, a: 1} : {r: 255, g: 255, b: 255, a: 1}];
    for (const layer of layers.reverse()) result = layer.flatMap(top => result.map(under => over(top, under)));
    return result;
  };
  const opacity = (el) => { let o = 1; for (let e = el; e; e = e.parentElement) o *= Number(getComputedStyle(e).opacity); return o; };
  const visible = (el) => { const r = el.getBoundingClientRect(); const s = getComputedStyle(el);
    return r.width > 0 && r.height > 0 && s.visibility !== 'hidden' && r.bottom > 0 && r.top < innerHeight && r.right > 0 && r.left < innerWidth; };
  const failures = [];
  const check = (el, color, what) => {
    const style = getComputedStyle(el);
    if (el.closest('[disabled], [aria-disabled="true"], .busy')) return;   // inactive controls are exempt
    if (opacity(el) === 0) return;   // not shown (a hidden progress timer, e.g. the token meter's while it measures)
    const size = parseFloat(style.fontSize), bold = Number(style.fontWeight) >= 700;
    const needed = (size >= 24 || (bold && size >= 18.66)) ? 3 : 4.5;
    const fg = parse(color); if (!fg) return;
    const alpha = fg.a * opacity(el);
    for (const bg of backgrounds(el)) {
      const r = ratio(over({...fg, a: alpha}, bg), bg);
      if (r < needed) { failures.push(`${what} "${(el.innerText || el.placeholder || '').trim().slice(0, 40)}" ${r.toFixed(2)}:1 (${color} on rgb(${bg.r|0},${bg.g|0},${bg.b|0}))`); return; }
    }
  };
  for (const el of document.querySelectorAll('body *')) {
    if (!visible(el) || ['SCRIPT', 'STYLE', 'svg', 'path'].includes(el.tagName)) continue;
    const own = [...el.childNodes].some(n => n.nodeType === 3 && n.textContent.trim());
    if (own) check(el, getComputedStyle(el).color, el.tagName.toLowerCase());
    if ((el.tagName === 'TEXTAREA' || el.tagName === 'INPUT') && el.placeholder && !el.value)
      check(el, getComputedStyle(el, '::placeholder').color, 'placeholder');
  }
  return failures;
}"""


@pytest.mark.parametrize("scheme", ["light", "dark"])
@pytest.mark.parametrize("view", VIEWS)
def test_text_contrast_meets_wcag_aa(visit, server, scheme, view):
    session = visit(view, "en", scheme)
    page = session.page
    short_reply(page, server, "some text")
    failures = page.evaluate(CONTRAST_JS)
    open_settings(page)
    expect(page.locator("#mode")).to_be_in_viewport(ratio=1)   # the drawer has slid in
    failures += page.evaluate(CONTRAST_JS)
    assert failures == [], "\n".join(failures)


def test_every_control_has_an_accessible_name(visit, server):
    session = visit()
    page = session.page
    short_reply(page, server, "hello")
    open_settings(page)
    cdp = session.context.new_cdp_session(page)
    tree = cdp.send("Accessibility.getFullAXTree")["nodes"]
    roles = {"button", "textbox", "slider", "spinbutton", "radio", "checkbox", "combobox", "link", "searchbox"}
    unnamed = [node.get("role", {}).get("value") for node in tree
               if not node.get("ignored") and node.get("role", {}).get("value") in roles
               and not (node.get("name", {}).get("value") or "").strip()]
    assert unnamed == []
    names = {node.get("name", {}).get("value") for node in tree if node.get("role", {}).get("value") == "button"}
    assert {"Send", "⚙ Settings"} <= names
    assert page.get_by_role("textbox", name="Message").count() == 1


def test_touch_targets_on_a_phone(visit, server):
    page = visit("phone").page
    short_reply(page, server, "hello")
    open_settings(page)   # the drawer's controls too
    small = page.evaluate("""() => [...document.querySelectorAll('button, input, textarea, [role=radio], a')]
        .map(e => e.closest('label') || e)   // a radio's or checkbox's target is its whole label
        .filter(e => { const r = e.getBoundingClientRect(); const s = getComputedStyle(e);
                       return r.width > 0 && r.height > 0 && s.visibility !== 'hidden' && r.top < innerHeight
                              && r.bottom > 0 && r.left < innerWidth && r.right > 0; })
        .map(e => [e.getAttribute('aria-label') || e.textContent.trim().slice(0, 20) || e.tagName,
                   Math.round(e.getBoundingClientRect().width), Math.round(e.getBoundingClientRect().height)])
        .filter(([, w, h]) => w < 24 || h < 24)""")
    assert small == []
    page.locator("#settings-drawer button").first.click()   # the drawer's own close toggle
    for selector in (SEND, "#open-settings", "#language-switch"):
        box = page.locator(selector).bounding_box()
        assert box["width"] >= 44 and box["height"] >= 44, (selector, box)


# -- public Gradio only --------------------------------------------------------------------------------------

def private_gradio_uses(source: str) -> list[str]:
    """Names of Gradio internals a module reaches: ``x._name`` on anything but ``self``/``cls``, assignments to
    a component's ``preprocess``/``postprocess``, ``.fns``, and imports of Gradio names that start with ``_``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            private = node.attr.startswith("_") and not (node.attr.startswith("__") and node.attr.endswith("__"))
            owner = node.value.id if isinstance(node.value, ast.Name) else None
            if private and owner not in ("self", "cls"):
                found.append(f"line {node.lineno}: .{node.attr}")
            if node.attr == "fns":
                found.append(f"line {node.lineno}: .fns")
            if node.attr in ("preprocess", "postprocess") and isinstance(node.ctx, ast.Store):
                found.append(f"line {node.lineno}: .{node.attr} replaced")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("gradio"):
            found += [f"line {node.lineno}: {node.module}.{a.name}" for a in node.names if a.name.startswith("_")]
            if node.module in ("gradio.events", "gradio.blocks", "gradio.routes", "gradio.chat_interface"):
                found.append(f"line {node.lineno}: {node.module}")
    return found


def test_the_page_uses_no_private_gradio_name():
    modules = sorted((REPO / "chatglm_web" / "page").glob("*.py"))
    assert modules
    used = {path.name: private_gradio_uses(path.read_text()) for path in modules}
    assert {name: uses for name, uses in used.items() if uses} == {}
    # and the check finds what the old page did
    old = ("from gradio.events import Dependency\nchat._append_message_to_history(x)\nid = chatbot._id\n"
           "for i in page.fns: pass\ncomponent.preprocess = lambda p: p\n")
    assert len(private_gradio_uses(old)) == 5


def test_the_page_strings_exist_in_both_languages():
    from chatglm_web.page.strings import STRINGS

    placeholders = re.compile(r"\{(\w+)")
    for key, (en, zh) in STRINGS.items():
        assert en.strip() and zh.strip(), key
        assert set(placeholders.findall(en)) == set(placeholders.findall(zh)), key


def test_the_errors_a_visitor_meets_most_are_in_chinese_too():
    from chatglm_web.engine.admission import AdmissionPolicy, EngineBusy
    from chatglm_web.generation import InvalidRequest, check_valid_text
    from chatglm_web.page.strings import translate_error

    with pytest.raises(EngineBusy) as busy:
        AdmissionPolicy(8, 32).check(8, 32)
    with pytest.raises(InvalidRequest) as surrogate:
        check_valid_text("ab\ud800", "message")
    for error, chinese in ((str(busy.value), "服务器繁忙：8 条回复正在生成，32 条在排队"),
                           (str(surrogate.value), "文本中有无效字符")):
        assert translate_error(error, "en") == error
        assert chinese in translate_error(error, "zh-CN"), error
