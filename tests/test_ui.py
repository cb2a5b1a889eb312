"""The page's promises that need no browser, checked on the real server (tiny ChatGLM3 on loopback) over HTTP.

* the key that encrypts the conversation kept in the browser is the same on every start;
* the "waiting for a free slot" line is never a chat message, so a Stop while waiting cannot send it
  back to the model as history;
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
import time
from pathlib import Path

import gradio as gr
import httpx
import pytest
from gradio_client import Client

from chatglm_web.branding import load_branding
from chatglm_web.browser_secret import ENV_VAR, FILE_NAME, browser_state_secret
from chatglm_web.generation import Finished, option
from chatglm_web.transcript import LEGACY_DOWNLOADS, to_json, to_markdown
from chatglm_web.page import STORAGE_KEY, build_page, stats_markdown
from chatglm_web.page.strings import I18N, STRINGS
from server_harness import page_turn_handlers, run_queued, running_server

SYSTEM = "You are a test assistant."
WAITING = "⏳"
TIMEOUT = 120


def chat_args(message, *, system=SYSTEM, max_new_tokens=8, seed=-1, mode="Chat"):
    """The /chat endpoint's inputs: message, system prompt, temperature, top-p, max new tokens, top-k,
    repetition penalty, seed, mode."""
    return [message, system, 0.8, 0.8, max_new_tokens, 0, 1.0, seed, mode]


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


def handler(config: dict, component_id: int, event: str) -> int:
    """Index of the one backend handler of ``event`` on the component."""
    found = [i for i, dep in enumerate(config["dependencies"])
             if [component_id, event] in dep["targets"] and dep.get("backend_fn")]
    assert len(found) == 1, f"{len(found)} handlers of {event} on component {component_id}"
    return found[0]


def call_handler(http, fn_index: int, data: list, session_hash: str = "ui-test"):
    """Call an unqueued handler of the page as the browser does (a State input's value is the session's own,
    whatever is sent for it)."""
    return http.post("gradio_api/run/predict",
                     json={"data": data, "fn_index": fn_index, "session_hash": session_hash})


def sampling_inputs(max_new_tokens: int, *, system=SYSTEM, seed=-1, mode="Chat") -> list:
    """The settings in the order the page's turn handler takes them (system prompt, sliders, seed, mode)."""
    return [system, 0.8, 0.8, max_new_tokens, 0, 1.0, seed, mode]


def chat_raw(http, data: list, session_hash: str | None = None) -> tuple[str, object]:
    """One /chat call with the JSON written by hand (``json.dumps`` escapes a lone surrogate; gradio_client
    cannot send one): (last event name, its data)."""
    body = json.dumps({"data": data, **({"session_hash": session_hash} if session_hash else {})}).encode("ascii")
    response = http.post("gradio_api/call/chat", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 200, response.text
    event, payload = None, None
    with http.stream("GET", f"gradio_api/call/chat/{response.json()['event_id']}") as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                event = line[len("event:"):].strip()
            elif line.startswith("data:") and event in ("complete", "error"):
                payload = json.loads(line[len("data:"):])
                break
    return event, payload


def wait_until(condition, what: str, seconds: float = 60):
    """Poll an in-process counter or a client's output list (neither offers an event to await)."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def files_under(path: Path) -> dict[str, int]:
    return {str(f): f.stat().st_size for f in path.rglob("*") if f.is_file()} if path.exists() else {}


def text_message(role: str, text: str) -> dict:
    """A message in the Chatbot's wire format."""
    return {"role": role, "content": [{"type": "text", "text": text}]}


def texts(history: list[dict]) -> list[tuple[str, str]]:
    """(role, text) of each message: its content as a string, or its text parts (the Chatbot's wire format) joined."""
    return [(m["role"], m["content"] if isinstance(m["content"], str)
             else "".join(part["text"] for part in m["content"])) for m in history]


def browser_state(page: gr.Blocks) -> gr.BrowserState:
    states = [b for b in page.blocks.values() if isinstance(b, gr.BrowserState) and b.storage_key == STORAGE_KEY]
    assert len(states) == 1
    return states[0]


# -- the key of the conversation kept in the browser ---------------------------------------------

def test_the_storage_key_is_the_same_on_every_start(server, dirs, monkeypatch):
    served = component(page_config(server), type="browserstate", storage_key=STORAGE_KEY)["props"]["secret"]
    key_file = dirs["cache"] / FILE_NAME
    assert key_file.read_text().strip() == served, "the page's key is not the one kept in the cache dir"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    # A later start (a second page for the same backend, as after a restart) uses the same key.
    monkeypatch.setenv("CHATGLM_WEB_CACHE", str(dirs["cache"]))
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert browser_state(build_page(server.backend, load_branding())).secret == served
    # The environment variable wins over the file.
    monkeypatch.setenv(ENV_VAR, "a key chosen by the operator")
    assert browser_state(build_page(server.backend, load_branding())).secret == "a key chosen by the operator"
    assert browser_state(build_page(server.backend, load_branding(), state_secret="given")).secret == "given"


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
    wait_until(lambda: server.engine.load == (1, 0), "the first request to take the only slot")
    client = Client(server.url, verbose=False)
    waiting = client.submit(*chat_args("I will wait"), api_name="/chat")
    wait_until(lambda: any(WAITING in str(output) for output in waiting.outputs()), "the waiting line")
    for reply, stats in waiting.outputs():
        assert not (isinstance(reply, str) and WAITING in reply), "the waiting line was sent as the reply"
    assert any(stats.startswith(f"{WAITING} Waiting for a free slot") for _, stats in waiting.outputs())
    cancelled = server.engine.finished["cancelled"]
    waiting.cancel()  # Stop while waiting
    wait_until(lambda: server.engine.finished["cancelled"] > cancelled, "the waiting request to be cancelled")
    busy.cancel()
    wait_until(lambda: server.engine.load == (0, 0), "the slot to be free")

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
    """A conversation stored by a 0.x page (restored into the chat) may hold the line as a reply: the next turn
    the page starts from that chat leaves it out of the prompt (the page's own handlers, as the browser calls
    them: begin without the queue, the reply through it, then finish)."""
    config = page_config(server)
    steps = page_turn_handlers(config)
    session = "legacy-conversation"
    history = [text_message("user", "Earlier question"),
               text_message("assistant", f"{WAITING} Waiting for a free slot… (position 3 in the queue)")]
    begun = call_handler(http, steps["begin"], ["Next question", history, None, None], session_hash=session)
    assert begun.status_code == 200, begun.text
    showing = call_handler(http, steps["show"], [None, None], session_hash=session)
    assert showing.status_code == 200, showing.text
    shown = showing.json()["data"][0]["value"]  # the chat with the new message, as the browser then shows it
    assert [m["role"] for m in shown] == ["user", "assistant", "user"], shown
    prompts = []
    submit = server.engine.submit
    monkeypatch.setattr(server.engine, "submit", lambda ids, *rest: prompts.append(ids) or submit(ids, *rest))
    events = run_queued(http, steps["respond"], [None, shown, *sampling_inputs(4), None], session)
    assert events[-1]["success"], events[-1]
    assert "reply 4 tokens" in json.dumps(events[-1]["output"]["data"][1], ensure_ascii=False), events[-1]
    finished = call_handler(http, steps["finish"], [events[-1]["output"]["data"][0]["value"]], session_hash=session)
    assert finished.status_code == 200, finished.text
    assert prompts == [server.backend.format.tokenizer.build_chat_input([
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": "Earlier question"},
        {"role": "user", "content": "Next question"}])]


# -- disk ---------------------------------------------------------------------------------------

def test_storing_and_downloading_the_conversation_write_nothing_to_disk(server, dirs, http):
    """The Chatbot's change handler (it stores the chat in the browser) and the two download buttons, called 10
    times each with a new 1 MB history."""
    config = page_config(server)
    chatbot = component(config, type="chatbot")["id"]
    store = handler(config, chatbot, "change")
    store_inputs = len(config["dependencies"][store]["inputs"])  # the chat, then the session's States
    markdown = handler(config, component(config, elem_id="download-md")["id"], "click")
    json_download = handler(config, component(config, elem_id="download-json")["id"], "click")
    before = files_under(dirs["gradio"]), files_under(LEGACY_DOWNLOADS)
    for n in range(10):
        history = [text_message("user", f"question {n}"), text_message("assistant", f"answer {n} " + "x" * 1_000_000)]
        stored = call_handler(http, store, [history] + [None] * (store_inputs - 1))
        assert stored.status_code == 200, stored.text[:300]
        assert texts(stored.json()["data"][0]) == texts(history), "the chat was not what got stored"
        md = call_handler(http, markdown, [history])
        js = call_handler(http, json_download, [history])
        assert md.status_code == 200 and js.status_code == 200
        assert md.json()["data"][0] == to_markdown(history), "the Markdown download is not the conversation"
        assert js.json()["data"][0] == to_json(history), "the JSON download is not the conversation"
    assert (files_under(dirs["gradio"]), files_under(LEGACY_DOWNLOADS)) == before, "files were written"


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
    if "max_new_tokens_clamped" not in Finished.__dataclass_fields__:
        pytest.skip("Finished has no max_new_tokens_clamped field yet")
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
    from chatglm_web.toolbox import Toolbox

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


def test_turn_controls_are_refused_while_busy():
    """While a reply streams, Send, an example, Retry and Edit refuse to begin a turn (the reason goes to the
    statistics line) and Undo changes nothing; idle, the same calls begin the turn."""
    from types import SimpleNamespace

    from chatglm_web.page import turns

    history = [{"role": "user", "content": [{"type": "text", "text": "earlier"}]},
               {"role": "assistant", "content": "reply"}]
    request = SimpleNamespace(session_hash="busy-test")
    begin = turns.Begin(turns.Refusals())
    calls = {
        "send": lambda busy: begin.send("new", history, busy, "en", request),
        "example": lambda busy: begin.example(history, busy, "en", SimpleNamespace(value={"text": "ex"}), request),
        "retry": lambda busy: begin.retry(history, busy, "en", SimpleNamespace(index=1), request),
        "edit": lambda busy: begin.edit(history, busy, "en", SimpleNamespace(index=0, value="edited"), request),
    }
    for name, call in calls.items():
        with pytest.raises(turns.Refused):
            call(True)
        assert "A reply is still being written" in begin.refused("en", request), name
        before, message = call(False)
        assert message == {"send": "new", "example": "ex", "retry": "earlier", "edit": "edited"}[name]
        assert before == (history if name in ("send", "example") else []), name
    assert turns.undo(history, True, SimpleNamespace(index=1)) == (gr.skip(), gr.skip(), gr.skip())
    kept, box, stored = turns.undo(history, False, SimpleNamespace(index=1))
    assert kept == [] and stored == [] and box.value == "earlier"   # content parts read as text
