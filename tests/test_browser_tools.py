"""Tools mode in headless Chromium: a tool step shows collapsed once done, and opens on a click to show the
call and its result. The model's replies are scripted at the engine boundary; the calculator is the real one."""

from __future__ import annotations

import pytest
from playwright.sync_api import expect

from browser_harness import SEND, TEXTAREA, Session, browser, expect_idle, open_settings  # noqa: F401 (a fixture)
from chatglm_web.families.chatglm3.tokenizer import ChatGLM3Tokenizer
from scripted_engine import ScriptedEngine
from server_harness import running_server

pytestmark = pytest.mark.browser

EXPRESSION = "1234 * 23.5 / 100"


@pytest.fixture(scope="module")
def server(long_reply_checkpoint, tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CHATGLM_WEB_CACHE", str(tmp_path_factory.mktemp("app-cache")))
        with running_server(model=str(long_reply_checkpoint)) as srv:
            srv.backend.backend.engine.shutdown()
            tokenizer = ChatGLM3Tokenizer.from_pretrained(long_reply_checkpoint)
            srv.backend.backend.engine = ScriptedEngine(tokenizer, [
                [("calculator", f'```python\ntool_call(expression="{EXPRESSION}")\n```')],
                [("", "That is the percentage you asked for.")]])
            yield srv


def test_a_tool_step_is_collapsed_when_done_and_opens_on_click(browser, server):
    session = Session(browser, server).open()
    page = session.page
    try:
        open_settings(page)  # the mode is chosen in the settings drawer
        page.locator("#mode").get_by_text("Tools", exact=True).click()
        expect(page.locator("#mode").get_by_role("radio", name="Tools")).to_be_checked()
        page.locator(TEXTAREA).fill("What is 23.5% of 1,234?")
        page.locator(SEND).click()
        chatbot = page.locator("#chatbot")
        expect(chatbot.get_by_text("That is the percentage you asked for.")).to_be_visible()
        expect_idle(page)
        title = chatbot.get_by_text("Tool: calculator")
        expect(title).to_be_visible()
        call = chatbot.get_by_text(EXPRESSION)  # in the call and in the result's JSON
        result = chatbot.get_by_text("289.99")
        # done: collapsed. The step's content may or may not be in the DOM while closed: none of it shows
        expect(call.filter(visible=True)).to_have_count(0)
        expect(result.filter(visible=True)).to_have_count(0)
        assert "tool_call(" not in chatbot.inner_text()
        title.click()
        expect(call.first).to_be_visible()
        expect(result.first).to_be_visible()
        assert len(server.backend.backend.engine.prompts) == 2
        session.assert_air_gapped()
    finally:
        session.context.close()
