"""The page's promises that need no browser, checked on the real server (tiny ChatGLM3 on loopback) over HTTP.

* the key that seals the conversations kept in the browser is the same on every start, and what another key
  sealed (or a forger wrote) is not taken: the page starts a new conversation and leaves that entry alone;
* the page never reads the chat's value back from the browser: a turn continues the server's own
  conversation tree;
* the "waiting for a free slot" line is never a chat message, so a Stop while waiting cannot send it
  back to the model as history (nor when an earlier version kept it in the browser);
* storing and downloading the conversation write nothing to disk; uploads are refused (the page has no
  upload control);
* an unpaired UTF-16 surrogate gets a clear message, and the server goes on answering;
* the sampling controls are built from ``generation.option``, the one declaration the API validates with,
  and labelled with the page's strings (``chatglm_web/page/strings.py``);
* ``/chat`` keeps the arguments and defaults it always had.
"""

from __future__ import annotations

import json
import logging
import stat
from functools import partial
from pathlib import Path

import gradio as gr
import httpx
import pytest
from gradio_client import Client

from chatglm_web.branding import load_branding
from chatglm_web.browser_secret import ENV_VAR, FILE_NAME, browser_state_secret
from chatglm_web.conversations.browser_store import BrowserStore
from chatglm_web.conversations.share import ShareLinks
from chatglm_web.conversations.tree import FORMAT, ROOT, Conversation
from chatglm_web.generation import Finished, option
from chatglm_web.browser_secret import browser_state_key
from chatglm_web.page import SETTINGS_KEY, STORAGE_KEY, build_page, stats_markdown
from chatglm_web.page.markers import marker
from chatglm_web.page.strings import I18N, STRINGS
from chatglm_web.conversations.transcript import LEGACY_DOWNLOADS, to_markdown
from server_harness import CONVERSATION_PREFIX, META_PREFIX, PageClient, requests_ended, running_server, sse_events
from server_harness import chat_args as http_chat_args
from waiting import wait_until

SYSTEM = "You are a test assistant."
WAITING = "⏳"
TIMEOUT = 120


# the /chat endpoint's inputs (server_harness.chat_args), with this module's system prompt and short replies
chat_args = partial(http_chat_args, system=SYSTEM, max_new_tokens=8)


# -- fixtures -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """The app's cache dir (where the key file goes) and Gradio's temp dir, both fresh for this module."""
    root = tmp_path_factory.mktemp("ui")
    return {"cache": root / "cache", "gradio": root / "gradio-temp"}


@pytest.fixture(scope="module")
def server(long_reply_checkpoint, dirs):
    """One generation slot, so that a second request waits for it."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("CHATGLM_WEB_CACHE", str(dirs["cache"]))
        env.setenv("GRADIO_TEMP_DIR", str(dirs["gradio"]))
        env.delenv(ENV_VAR, raising=False)
        with running_server(model=str(long_reply_checkpoint), max_batch_size=1, max_new_tokens=4096) as srv:
            yield srv


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=TIMEOUT) as client:
        yield client


# -- helpers ------------------------------------------------------------------------------------

def page_config(server) -> dict:
    return httpx.get(server.url + "config", timeout=TIMEOUT).json()


def component(config: dict, **match) -> dict:
    found = [c for c in config["components"]
             if all(c.get(k) == v or c["props"].get(k) == v for k, v in match.items())]
    assert len(found) == 1, f"{len(found)} components match {match}"
    return found[0]


def chat_raw(http, data: list, session_hash: str | None = None) -> tuple[str, object]:
    """One /chat call with the JSON written by hand (``json.dumps`` escapes a lone surrogate; gradio_client
    cannot send one): (last event name, its data)."""
    body = json.dumps({"data": data, **({"session_hash": session_hash} if session_hash else {})}).encode("ascii")
    response = http.post("gradio_api/call/chat", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    event, payload = None, None
    with http.stream("GET", f"gradio_api/call/chat/{response.json()['event_id']}") as stream:
        for event, payload in sse_events(stream.iter_lines()):
            if event in ("complete", "error"):
                return event, payload
    return event, None


def files_under(path: Path) -> dict[str, int]:
    return {str(f): f.stat().st_size for f in path.rglob("*") if f.is_file()} if path.exists() else {}


def text_message(role: str, text: str) -> dict:
    """A message in the Chatbot's wire format."""
    return {"role": role, "content": [{"type": "text", "text": text}]}


def texts(history: list[dict]) -> list[tuple[str, str]]:
    """(role, text) of each message: its content as a string, or its text parts (the Chatbot's wire format) joined."""
    return [(m["role"], m["content"] if isinstance(m["content"], str)
             else "".join(part["text"] for part in m["content"])) for m in history]


def browser_state(page: gr.Blocks, key: str = SETTINGS_KEY) -> gr.BrowserState:
    states = [b for b in page.blocks.values() if isinstance(b, gr.BrowserState) and b.storage_key == key]
    assert len(states) == 1
    return states[0]


def key_file_store(dirs) -> BrowserStore:
    """What the page seals and opens with, given the key in the app's cache dir."""
    return BrowserStore((dirs["cache"] / FILE_NAME).read_text().strip())


def exchange(user: str, assistant: str) -> Conversation:
    conversation = Conversation()
    message = conversation.add_user(ROOT, user)
    reply = conversation.add_reply(message.id)
    conversation.set_reply(reply.id, [{"role": "assistant", "content": assistant}])
    return conversation


def texts_of(chat: list[dict]) -> list[tuple[str, str]]:
    return texts(chat or [])


# -- the key of the conversations kept in the browser -----------------------------------------

def test_the_storage_key_is_the_same_on_every_start(server, dirs, http, monkeypatch):
    """What the page keeps in the browser is sealed with the key made once in the app's cache dir (mode 0600), so
    it opens again after a restart; a later start uses the same key, $CHATGLM_WEB_STATE_SECRET wins over the file."""
    key_file = dirs["cache"] / FILE_NAME
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    kept = exchange("sealed before a restart", "and opened after it")
    page = PageClient(http)
    page.local.update({CONVERSATION_PREFIX + kept.id: key_file_store(dirs).seal(kept)[0],
                       META_PREFIX + kept.id: key_file_store(dirs).seal(kept)[1]})
    page.tab = kept.id
    page.load()
    assert texts_of(page.chat()) == [("user", "sealed before a restart"), ("assistant", "and opened after it")]
    assert page.tab == kept.id
    # The settings' gr.BrowserState key is the same for a page built later (as after a restart) ...
    served = browser_state(server.page).secret
    monkeypatch.setenv("CHATGLM_WEB_CACHE", str(dirs["cache"]))
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert browser_state(build_page(server.backend, load_branding())).secret == served
    # ... and no gr.BrowserState holds the state secret itself (Gradio serves it): only a key derived from it
    states = [b for b in server.page.blocks.values() if isinstance(b, gr.BrowserState)]
    assert [b.storage_key for b in states] == [SETTINGS_KEY]
    assert served == browser_state_key((dirs["cache"] / FILE_NAME).read_text().strip()) != \
        (dirs["cache"] / FILE_NAME).read_text().strip()
    # ... and the environment variable, or the key given to build_page, wins over the file.
    monkeypatch.setenv(ENV_VAR, "a key chosen by the operator")
    chosen = browser_state(build_page(server.backend, load_branding())).secret
    assert chosen != served and browser_state(build_page(server.backend, load_branding())).secret == chosen
    given = browser_state(build_page(server.backend, load_branding(), state_secret="given")).secret
    assert given not in (served, chosen)


def test_an_entry_sealed_with_another_key_is_left_alone(http, dirs):
    """A stored conversation the page cannot open (sealed under another CHATGLM_WEB_STATE_SECRET, damaged, or
    forged) is not shown and not overwritten: the tab starts a new conversation beside it, so going back to the
    old key brings it back."""
    other = exchange("kept under the old key", "still there")
    forged = exchange("forged", "never shown")
    sealed_elsewhere = BrowserStore("another key").seal(other)
    page = PageClient(http)
    page.local.update({CONVERSATION_PREFIX + other.id: sealed_elsewhere[0], META_PREFIX + other.id: sealed_elsewhere[1],
                       CONVERSATION_PREFIX + forged.id: "1." + "A" * 80, META_PREFIX + forged.id: "not sealed",
                       })
    before = dict(page.local)
    for tab in (other.id, forged.id):
        page.tab = tab
        loaded = page.load()
        assert loaded.ok and page.chat() == [], "an entry the page cannot open was shown"
        assert page.tab not in (other.id, forged.id), "the tab kept the id of the unreadable entry"
        turn = page.turn("a new conversation", max_new_tokens=2, seed=1)
        assert turn.stream and turn.stream[-1]["success"], turn.stream[-1:]
        assert {k: v for k, v in page.local.items() if k in before} == before, "an unreadable entry was overwritten"
        assert CONVERSATION_PREFIX + page.tab in page.local, "the new conversation was not stored"
    # the list shows only what the page can read: the two new conversations
    new = {key[len(META_PREFIX):] for key in page.local if key.startswith(META_PREFIX)} - {other.id, forged.id}
    assert len(new) == 2 and {conversation for _, conversation in page.listed()} == new, page.listed()


def served_strings(value) -> set[str]:
    """Every string in a JSON value (long enough to be a key)."""
    if isinstance(value, dict):
        return set().union(*map(served_strings, value.values())) if value else set()
    if isinstance(value, list):
        return set().union(*map(served_strings, value)) if value else set()
    return {value} if isinstance(value, str) and len(value) >= 16 else set()


def test_nothing_the_page_serves_opens_what_it_seals(http, dirs):
    """Share links and the stored conversations are sealed so that nobody can forge or alter one: the key is in
    nothing the page serves to a visitor (its config), or anyone could make a link that shows made-up replies as
    the model's, or hand the page a conversation it takes for its own."""
    page = PageClient(http)
    page.load()
    page.turn("share me", max_new_tokens=2, seed=1)
    token = page.run(page.handler("share", "click"))[0].data[0]
    stored = page.stored()
    secret = (dirs["cache"] / FILE_NAME).read_text().strip()
    assert ShareLinks(secret).open(token) and BrowserStore(secret).open(stored)   # what the page made, with its key

    def opens(key: str) -> bool:
        for attempt in (lambda: ShareLinks(key).open(token), lambda: BrowserStore(key).open(stored)):
            try:
                attempt()
                return True
            except ValueError:
                pass
        return False

    config = httpx.get(str(http.base_url) + "config", timeout=TIMEOUT).json()
    revealing = sorted({f"{key[:6]}… ({len(key)} characters)" for key in served_strings(config) if opens(key)})
    assert revealing == [], "the config a visitor gets holds the key that seals share links and stored conversations"


def test_the_key_file_is_created_once(tmp_path, caplog):
    first = browser_state_secret(tmp_path / "cache", environ={})
    assert len(first) >= 32 and browser_state_secret(tmp_path / "cache", environ={}) == first
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [FILE_NAME], "a temporary file was left behind"
    # Where no file can be made, the page still gets a key (for this process only) and the log says why.
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    with caplog.at_level(logging.WARNING, logger="chatglm_web.browser_secret"):
        fallback = browser_state_secret(blocked / "cache", environ={})
    assert fallback and fallback != first and ENV_VAR in caplog.text


# -- the queue status is not a chat message -------------------------------------------------------

def test_a_stop_while_waiting_for_a_slot_leaves_no_status_in_the_history(server, monkeypatch):
    busy = Client(server.url, verbose=False).submit(*chat_args("Keep the only slot busy", max_new_tokens=4000),
                                                     api_name="/chat")
    wait_until(lambda: server.engine.load == (1, 0), TIMEOUT, "the first request to take the only slot")
    client = Client(server.url, verbose=False)
    waiting = client.submit(*chat_args("I will wait"), api_name="/chat")
    wait_until(lambda: any(WAITING in str(output) for output in waiting.outputs()), TIMEOUT, "the waiting line")
    for reply, stats in waiting.outputs():
        assert not (isinstance(reply, str) and WAITING in reply), "the waiting line was sent as the reply"
    assert any(stats.startswith(f"{WAITING} Waiting for a free slot") for _, stats in waiting.outputs())
    cancelled = requests_ended(server, "cancelled")
    waiting.cancel()  # Stop while waiting
    wait_until(lambda: requests_ended(server, "cancelled") > cancelled and server.engine.load == (1, 0), TIMEOUT,
               "the waiting request to be cancelled (and only the busy one left)")
    busy.cancel()
    wait_until(lambda: server.engine.load == (0, 0), TIMEOUT, "the slot to be free")

    prompts = []
    submit = server.engine.submit
    monkeypatch.setattr(server.engine, "submit", lambda ids, *rest: prompts.append(ids) or submit(ids, *rest))
    reply, stats = client.predict(*chat_args("next question"), api_name="/chat")  # same session, same history
    assert "reply 8 tokens" in stats
    tokenizer = server.backend.format.tokenizer
    assert WAITING not in tokenizer.decode(prompts[-1])
    assert "I will wait" in tokenizer.decode(prompts[-1]), "/chat did not keep its session's history"
    assert prompts[-1] == tokenizer.build_chat_input([
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": "I will wait"},
        {"role": "user", "content": "next question"}])


def test_a_waiting_line_kept_by_an_earlier_version_is_not_sent_as_history(server, http, monkeypatch):
    """A conversation stored by a 0.x page (its gr.BrowserState, taken into the list when the page loads) may hold
    the line as a reply: the next turn leaves it out of the prompt (the page's own handlers, as the browser calls
    them: load, then begin, show, respond and finish)."""
    page = PageClient(http, "legacy-conversation")
    history = [text_message("user", "Earlier question"),
               text_message("assistant", f"{WAITING} Waiting for a free slot… (position 3 in the queue)")]
    loaded = page.load(legacy=history)
    assert loaded.ok
    assert [role for role, _ in texts_of(page.chat())] == ["user", "assistant"], page.chat()
    assert CONVERSATION_PREFIX + page.tab in page.local, "the old conversation did not join the list"
    # the old entry goes (store.js removes it), so that it does not join the list again on the next load
    ops = loaded.data[page.dependencies[loaded.index]["outputs"].index(page.store_ops)]
    assert ops.get("drop_legacy") is True, f"the old entry is not removed: {ops!r}"
    prompts = []
    submit = server.engine.submit
    monkeypatch.setattr(server.engine, "submit", lambda ids, *rest: prompts.append(ids) or submit(ids, *rest))
    turn = page.turn("Next question", system_prompt=SYSTEM, max_new_tokens=4)
    assert turn.stream and turn.stream[-1]["success"], turn.stream[-1:]
    assert "reply 4 tokens" in turn.stats, turn.stats
    assert [role for role, _ in texts_of(page.chat())][:3] == ["user", "assistant", "user"], page.chat()
    assert prompts == [server.backend.format.tokenizer.build_chat_input([
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": "Earlier question"},
        {"role": "user", "content": "Next question"}])]


def test_the_page_never_takes_the_chat_back_from_the_browser(server, http, monkeypatch):
    """No handler reads the Chatbot's value: what a browser could send as the chat is not the conversation. A
    turn continues the session's own tree (here: after a first exchange, a second one sends both messages)."""
    config = PageClient(http).config
    chatbot = component(config, type="chatbot")["id"]
    assert [i for i, dep in enumerate(config["dependencies"]) if chatbot in dep["inputs"]] == []
    page = PageClient(http)
    page.load()
    page.turn("first", system_prompt=SYSTEM, max_new_tokens=2, seed=1)
    (_, first_reply), *_ = [m for m in texts_of(page.chat()) if m[0] == "assistant"]
    prompts = []
    submit = server.engine.submit
    monkeypatch.setattr(server.engine, "submit", lambda ids, *rest: prompts.append(ids) or submit(ids, *rest))
    page.turn("second", system_prompt=SYSTEM, max_new_tokens=2, seed=1)
    assert len(prompts) == 1
    assert prompts[0] == server.backend.format.tokenizer.build_chat_input([
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": "first"},
        {"role": "assistant", "content": first_reply}, {"role": "user", "content": "second"}]), \
        server.backend.format.tokenizer.decode(prompts[0])


# -- disk ---------------------------------------------------------------------------------------

def test_storing_and_downloading_the_conversation_write_nothing_to_disk(server, dirs, http):
    """Storing the conversation (the step after every change of the chat) and the two download buttons, 10 times
    each with a new 1 MB conversation: the browser gets it sealed, the downloads as text, and no file is written."""
    before = files_under(dirs["gradio"]), files_under(LEGACY_DOWNLOADS)
    store = key_file_store(dirs)
    for n in range(10):
        history = [text_message("user", f"question {n}"), text_message("assistant", f"answer {n} " + "x" * 999_000)]
        page = PageClient(http)
        page.load(legacy=history)   # a conversation that big arrives only from the browser: an old page kept it
        stored = page.run(page.handler("chatbot", "change"))
        assert all(step.ok for step in stored), [(s.index, s.response) for s in stored if not s.ok]
        kept = store.open(page.stored())
        assert texts(kept.messages()) == texts(history), "the chat was not what got stored"
        markdown = page.run(page.handler("download-md", "click"))[0]
        json_download = page.run(page.handler("download-json", "click"))[0]
        assert markdown.ok and json_download.ok
        assert markdown.data[0] == to_markdown(history), "the Markdown download is not the conversation"
        tree = Conversation.from_dict(json.loads(json_download.data[0]))
        assert json.loads(json_download.data[0])["format"] == FORMAT and tree.id == kept.id
        assert texts(tree.messages()) == texts(history), "the JSON download is not the conversation"
    assert (files_under(dirs["gradio"]), files_under(LEGACY_DOWNLOADS)) == before, "files were written"


def test_the_downloads_are_the_shown_branch_and_the_whole_tree(http, dirs):
    """Markdown: the conversation as it is shown (the shown version of each message, how a reply ended, no version
    links); JSON: the whole tree, every version, which the list's Import reads back."""
    tree = exchange("question", "first answer")
    user = tree.path()[0]
    second = tree.add_reply(user.id)
    tree.set_reply(second.id, [{"role": "assistant", "content": "second answer"}], "length")
    assert [node.id for node in tree.path()] == [user.id, second.id]
    store = key_file_store(dirs)
    page = PageClient(http)
    sealed, meta = store.seal(tree)
    page.local.update({CONVERSATION_PREFIX + tree.id: sealed, META_PREFIX + tree.id: meta})
    page.tab = tree.id
    page.load()
    assert any("version-nav" in text for _, text in texts_of(page.chat())), "the chat shows no version links"
    markdown = page.run(page.handler("download-md", "click"))[0].data[0]
    assert markdown == to_markdown([{"role": "user", "content": "question"},
                                    {"role": "assistant", "content": "second answer"},
                                    marker("length", "en")])
    downloaded = Conversation.from_dict(json.loads(page.run(page.handler("download-json", "click"))[0].data[0]))
    assert downloaded.to_dict() == tree.to_dict()


def test_uploads_are_refused(http, dirs):
    """The page has no upload control: every upload is refused before anything is written (before the
    HTTP guard came, uploads were limited to 1 MB; now none is taken)."""
    before = files_under(dirs["gradio"])
    for name, size in (("big.bin", 2_000_000), ("small.bin", 1000)):
        refused = http.post("gradio_api/upload", files={"files": (name, b"\0" * size)})
        assert refused.status_code == 403, refused.text[:300]
        assert refused.json()["error"]["code"] == "uploads_disabled", refused.text[:300]
    assert files_under(dirs["gradio"]) == before, "an upload was written"


# -- odd text -----------------------------------------------------------------------------------

@pytest.mark.parametrize("message, system, where", [
    ("hello \ud800", SYSTEM, "message"),
    ("hello", "be nice \udfff", "system prompt"),
])
def test_an_unpaired_surrogate_gets_a_clear_message(http, message, system, where):
    event, payload = chat_raw(http, chat_args(message, system=system))
    assert event == "error" and isinstance(payload, dict), (event, payload)
    assert f"The {where} contains an invalid character" in str(payload.get("error")), payload
    event, payload = chat_raw(http, chat_args("\ud83d\ude00 still there?", max_new_tokens=4))  # a proper pair
    assert event == "complete" and "reply 4 tokens" in payload[-1], (event, payload)


# -- controls and statistics --------------------------------------------------------------------

def test_the_sampling_controls_are_built_from_the_options(server):
    config = page_config(server)
    english = config["i18n_translations"]["en"]
    for name, elem_id in [("temperature", "temperature"), ("top_p", "top-p"), ("max_new_tokens", "max-new-tokens"),
                          ("top_k", "top-k"), ("repetition_penalty", "repetition-penalty")]:
        spec, props = option(name), component(config, elem_id=elem_id)["props"]
        maximum = min(spec.maximum, 4096) if name == "max_new_tokens" else spec.maximum
        assert (props["minimum"], props["maximum"], props["step"]) == (spec.minimum, maximum, spec.step), name
        # labelled with the page's strings (translated in the browser), named after the option
        assert (props["value"], props["label"], props["info"]) == (spec.default, str(I18N(name)),
                                                                   str(I18N(f"{name}_info"))), name
        assert english[name] == STRINGS[name][0] and english[f"{name}_info"] == STRINGS[f"{name}_info"][0], name
    seed = component(config, elem_id="seed")["props"]
    assert seed["value"] == -1 and seed["label"] == str(I18N("seed"))
    assert english["seed"].startswith(option("seed").label)


def test_the_statistics_line_says_when_the_reply_budget_was_lowered():
    done = Finished(reason="length", prompt_tokens=8000, completion_tokens=192, seconds=2.0)
    assert "lowered" not in stats_markdown(done)
    clamped = Finished(reason="length", prompt_tokens=8000, completion_tokens=192, seconds=2.0,
                       max_new_tokens_clamped=192)
    assert "reply budget lowered to 192 tokens to fit the context" in stats_markdown(clamped)


def test_a_request_refused_by_the_page_is_logged_in_one_line(server, caplog):
    caplog.set_level(logging.INFO, logger="chatglm_web.requests")
    with pytest.raises(Exception, match="temperature"):
        Client(server.url, verbose=False).predict("hi", "", 9.0, 0.8, 8, 0, 1.0, -1, "Chat", api_name="/chat")
    lines = [r.getMessage() for r in caplog.records if r.name == "chatglm_web.requests"]
    assert len(lines) == 1 and "invalid" in lines[0] and "temperature" in lines[0]
    assert not any(r.exc_info for r in caplog.records)


def test_the_chat_endpoint_keeps_its_defaults(server):
    """A client written for the earlier page may leave out the mode (Chat), or every setting: ``/chat`` had
    defaults for all but the message (system prompt "", the sliders' defaults, seed -1, mode Chat)."""
    client = Client(server.url, verbose=False)
    _, stats = client.predict("hi", "", 0.8, 0.8, 4, 0, 1.0, -1, api_name="/chat")
    assert "reply 4 tokens" in stats, stats
    reply, stats = client.predict("hi", api_name="/chat")
    assert reply and "tokens/s" in stats, stats


def test_modes_the_model_cannot_serve_are_not_offered_and_the_page_says_why():
    """A chat-template model (the offline demo) cannot call tools: only Chat, with the reason under the selector."""
    from types import SimpleNamespace

    from chatglm_web.generation import ModelInfo
    from chatglm_web.tools.toolbox import Toolbox

    def mode_radio(tools: bool) -> gr.Radio:
        info = ModelInfo(name="HuggingFaceTB/SmolLM2-135M-Instruct (offline demo model)", precision="fp32",
                         device="cpu", context_length=2048, offline_demo=not tools, tools=tools)
        page = build_page(SimpleNamespace(info=info), load_branding(), toolbox=Toolbox(registry=lambda: None))
        [radio] = [b for b in page.blocks.values() if isinstance(b, gr.Radio) and b.elem_id == "mode"]
        return radio

    demo = mode_radio(tools=False)
    assert [value for _, value in demo.choices] == ["Chat"] and not demo.interactive
    assert "SmolLM2-135M-Instruct cannot call tools" in demo.info
    chatglm3 = mode_radio(tools=True)
    assert [value for _, value in chatglm3.choices] == ["Chat", "Tools"] and chatglm3.interactive


def test_the_demo_banner_is_for_visitors_and_the_operators_hint_goes_to_the_log(caplog):
    from chatglm_web.generation import ModelInfo
    from chatglm_web.page.layout import banner_html, top_bar_html

    info = ModelInfo(name="SmolLM2-135M-Instruct (offline demo model, GGUF Q4_1)", precision="fp32", device="cpu",
                     context_length=2048, offline_demo=True,
                     notes=["start with `python app.py --model /path/to/chatglm3-6b`"])
    assert "Demo model SmolLM2-135M-Instruct is answering; chatglm3-6b is not available on this server." in \
        banner_html(info, "en")
    assert "当前由演示模型 SmolLM2-135M-Instruct 回答" in banner_html(info, "zh-CN")
    assert ">SmolLM2-135M-Instruct</h1>" in top_bar_html(info, "en")
    from types import SimpleNamespace

    with caplog.at_level(logging.WARNING):
        page = build_page(SimpleNamespace(info=info), load_branding())
    assert "--model /path/to/chatglm3-6b" in caplog.text
    assert "--model" not in page.config["components"].__repr__()   # not on the page


def test_turn_controls_are_refused_while_busy_or_read_only():
    """While a reply streams (or on a share link's read-only view), Send, an example, Retry and Edit refuse to begin
    a turn (the reason goes to the statistics line) and Undo changes nothing; idle, the same calls plan the turn:
    a new message after the last reply, a new version of the reply (Retry) or of the message (Edit)."""
    from types import SimpleNamespace

    from chatglm_web.page import turns
    from chatglm_web.page.conversation_view import view

    tree = exchange("earlier", "reply")
    user, reply = (node.id for node in tree.path())
    shown = view(tree, "en")[1]
    request = SimpleNamespace(session_hash="busy-test")
    begin = turns.Begin(turns.Refusals())
    calls = {
        "send": lambda busy, ro: begin.send("new", tree, busy, ro, "en", request),
        "example": lambda busy, ro: begin.example(tree, busy, ro, "en", SimpleNamespace(value={"text": "ex"}), request),
        "retry": lambda busy, ro: begin.retry(tree, shown, busy, ro, "en", SimpleNamespace(index=1), request),
        "edit": lambda busy, ro: begin.edit(tree, shown, busy, ro, "en", SimpleNamespace(index=0, value="edited"),
                                            request),
    }
    planned = {"send": {"parent": reply, "text": "new"}, "example": {"parent": reply, "text": "ex"},
               "retry": {"user": user}, "edit": {"parent": ROOT, "text": "edited"}}
    for name, call in calls.items():
        with pytest.raises(turns.Refused):
            call(True, False)
        assert "A reply is still being written" in begin.refused("en", request), name
        with pytest.raises(turns.Refused):
            call(False, True)
        assert STRINGS["read_only"][0] in begin.refused("en", request), name
        assert call(False, False) == planned[name], name
    assert tree.size() == 2, "a plan changed the tree"
    for busy, readonly in ((True, False), (False, True)):
        assert turns.undo(tree, shown, busy, readonly, "en", SimpleNamespace(index=1)) == (gr.skip(),) * 3
    assert tree.size() == 2
    chat, kept, box = turns.undo(tree, shown, False, False, "en", SimpleNamespace(index=1))
    assert chat["value"] == [] and kept == [] and box.value == "earlier" and tree.empty
