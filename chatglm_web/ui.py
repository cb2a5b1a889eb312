"""The Gradio page. It knows nothing about models: it talks to a ``ChatBackend``.

Built on ``gr.ChatInterface`` (streaming, Stop, Regenerate, Undo, Clear, edit, copy, the
``/chat`` API endpoint) with the sampling controls as additional inputs and a statistics line
as an additional output. The current conversation is kept in the browser (``gr.BrowserState``,
encrypted with a key that survives restarts) and restored on reload; it can be downloaded as
Markdown or JSON (built when a button is clicked, saved by the browser; nothing on the server's disk).

What the page guarantees beyond Gradio's defaults:

* after an error the input box is usable again and holds the message that failed (Gradio 6.31's
  front end runs no ``.then`` step after a failed event, so ChatInterface would leave it disabled);
* the queue position is shown in the statistics line, never as a chat message, so it can never be
  sent back to the model as history;
* HTML in a message stays inside its bubble (see ``MESSAGE_CSS``).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import OrderedDict
from contextlib import aclosing

import gradio as gr
from gradio.events import Dependency
from gradio.processing_utils import save_bytes_to_cache
from gradio.utils import get_upload_folder

from .branding import Branding
from .chat_format import normalize_messages
from .browser_secret import browser_state_secret
from .agent import StepFinished, run_agent
from .generation import (BackendBusy, ChatBackend, Finished, InvalidRequest, Queued, SamplingParams, TextDelta,
                         check_valid_text, option)
from .steps import TurnView, step_messages
from .toolbox import CHAT, INTERPRETER, TOOLS
from .transcript import remove_legacy_downloads, to_json, to_markdown

log = logging.getLogger(__name__)
request_log = logging.getLogger("chatglm_web.requests")  # one line per request, as the backend writes them

LATEX = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "$", "right": "$", "display": False},
    {"left": "\\(", "right": "\\)", "display": False},
    {"left": "\\[", "right": "\\]", "display": True},
]
STORAGE_KEY = "chatglm-web-conversation"
#: Largest upload the server accepts. The page has no upload control; this keeps Gradio's upload route small.
MAX_FILE_SIZE = "1mb"
#: (every, older than) in seconds: how often Gradio deletes the files in its cache, and which.
DELETE_CACHE = (600, 600)

#: Messages may contain HTML (sanitized: no scripts, but inline styles stay). Containment makes each
#: bubble the containing block of fixed/absolute children and clips them, so no message can cover the
#: page. Part of the page, not of assets/style.css, so that re-branding cannot drop it.
MESSAGE_CSS = """
#chatbot [data-testid="user"], #chatbot [data-testid="bot"] { contain: layout paint; isolation: isolate; overflow: auto; }
"""

_QUEUE_STATUS = "⏳ Waiting for a free slot… (position {} in the queue)"
_QUEUE_STATUS_RE = re.compile(r"⏳ Waiting for a free slot… \(position \d+ in the queue\)")
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def header_markdown(backend: ChatBackend) -> str:
    info = backend.info
    line = (f"**Model** `{info.name}` · **Precision** {info.precision} · **Device** {info.device} · "
            f"**Context** {info.context_length} tokens")
    notes = "".join(f"\n\n> ⚠️ {note}" for note in info.notes)
    return line + notes


def stats_markdown(done: Finished) -> str:
    if done.reason == "error":
        return f"⚠️ Generation failed: {done.error}"
    parts = [f"prompt {done.prompt_tokens} tokens", f"reply {done.completion_tokens} tokens",
             f"{done.tokens_per_second:.1f} tokens/s"]
    text = " · ".join(parts)
    if done.reason == "length":
        text += " · stopped at the max-new-tokens limit"
    elif done.reason == "cancelled":
        text += " · stopped"
    clamped = getattr(done, "max_new_tokens_clamped", None)
    if clamped:
        text += f" · reply budget lowered to {clamped} tokens to fit the context"
    if done.dropped_messages:
        text += (f"\n\nℹ️ The conversation is longer than the model's context: the {done.dropped_messages} oldest "
                 "messages were left out of the prompt (the system prompt is kept).")
    return text


def queue_status(position: int) -> str:
    """The statistics line while a request waits for a slot."""
    return _QUEUE_STATUS.format(position)


def _strings(value):
    """Every string in ``value`` (a string, or lists/dicts of them)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _strings(item)


def printable(text) -> str:
    """``text`` with every unpaired surrogate replaced by U+FFFD, so that it can be sent to the browser."""
    if not isinstance(text, str):
        return ""
    return _LONE_SURROGATE.sub("\ufffd", text)


def check_text(message, system_prompt, history) -> None:
    """Reject unpaired surrogates with a message that says where they are (raises ``InvalidRequest``): Gradio
    would fail to send such text back, with a bare ``{"error": null}``."""
    for what, value in (("message", message), ("system prompt", system_prompt), ("conversation", history)):
        for text in _strings(value):
            check_valid_text(text, what)


def validate_message(message):
    """ChatInterface's check of a typed message before it is shown: one Gradio cannot send back is refused."""
    try:
        check_text(message, None, None)
    except InvalidRequest as error:
        return gr.validate(False, str(error))
    return gr.validate(True, "")


def conversation(system_prompt, history, message, system_message: dict | None = None) -> list[dict]:
    """The messages for the model: system prompt (or the mode's ``system_message``), the history (never a
    queue status; each tool step as the exact ChatGLM3 messages it stands for, see ``steps.py``), new message."""
    messages = []
    if system_message is not None:
        messages.append(system_message)
    elif system_prompt and system_prompt.strip():
        messages.append({"role": "system", "content": system_prompt})
    for item in history or []:
        if not isinstance(item, dict) or item.get("role") not in ("user", "assistant"):
            continue
        if item["role"] == "assistant":
            kept = step_messages(item)
            if kept is not None:  # a tool step: the call and the observation; a note or an image: nothing
                messages += kept
                continue
            if _QUEUE_STATUS_RE.fullmatch(normalize_messages([item])[0]["content"].strip()):
                continue  # left in conversations kept by earlier versions
        messages.append(item)
    messages.append({"role": "user", "content": message})
    return messages


def seed_value(seed):
    """The seed box's value for ``SamplingParams``: -1 or empty means a random seed (None)."""
    if seed is None or (isinstance(seed, str) and not seed.strip()):
        return None
    if not isinstance(seed, bool) and isinstance(seed, (int, float)) and seed == -1:
        return None
    return seed


class TurnFailures:
    """The last failed turn's error per browser session, until the page's failure step picks it up.

    Gradio reports a Stop to the page as a failure of the turn too; only a turn that raised is
    recorded here, which tells the two apart. Bounded: API clients' errors are never picked up.
    """

    def __init__(self, limit: int = 1024):
        self.limit = limit
        self._errors: OrderedDict[str, str] = OrderedDict()

    def record(self, request: gr.Request | None, error: str) -> None:
        session = getattr(request, "session_hash", None)
        if not session:
            return
        self._errors[session] = error
        self._errors.move_to_end(session)
        while len(self._errors) > self.limit:
            self._errors.popitem(last=False)

    def pop(self, request: gr.Request | None) -> str | None:
        return self._errors.pop(getattr(request, "session_hash", None) or "", None)

    def __len__(self) -> int:
        return len(self._errors)


def make_chat_fn(backend: ChatBackend, failures: TurnFailures | None = None, toolbox=None):
    """The ChatInterface function (also the ``/chat`` API): streams (reply, statistics line).

    In Chat mode the reply is its text; in Tools and Code interpreter mode (``toolbox``) it is the turn's
    messages: text, a collapsible step per call (``steps.py``), images. Every error is raised as a
    ``gr.Error`` with a message for the user, and recorded in ``failures`` for the page's failure step.
    """
    failures = TurnFailures() if failures is None else failures

    async def chat(message, history, system_prompt, temperature, top_p, max_new_tokens, top_k,
                   repetition_penalty, seed, mode=CHAT, request: gr.Request = None):
        failed = None
        try:
            try:
                check_text(message, system_prompt, history)
                params = SamplingParams.from_form(
                    temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, top_k=top_k,
                    repetition_penalty=repetition_penalty, seed=seed_value(seed))
                runner = await _runner(toolbox, mode, request)
            except InvalidRequest as error:  # refused before the backend, which logs every request it sees
                request_log.info("request invalid: %s", error)
                raise
            if runner is None:
                turn = _chat_turn(backend, conversation(system_prompt, history, message), params)
            else:
                messages = conversation(system_prompt, history, message, runner.system_message())
                turn = _agent_turn(backend, messages, params, runner)
            # aclosing: however this generator ends (Stop, disconnect, error), the generation is cancelled
            async with aclosing(turn) as updates:
                async for update in updates:
                    if isinstance(update, Finished):
                        failed = f"Generation failed: {update.error}"
                    else:
                        yield update
        except (InvalidRequest, BackendBusy) as error:
            failed = str(error)
        except Exception:  # a bug must not leave the page stuck either
            log.exception("chat request failed")
            failed = "Something went wrong on the server; the error is in its log."
        if failed is not None:
            failures.record(request, failed)
            raise gr.Error(failed, print_exception=False)

    return chat


async def _runner(toolbox, mode, request):
    """The mode's runner (None: plain chat); ``InvalidRequest`` for a mode this app does not offer."""
    if mode in (None, "", CHAT):
        return None
    if toolbox is None:
        raise InvalidRequest(f"this app does not offer the mode {mode!r}")
    try:
        client = getattr(getattr(request, "client", None), "host", None)
        return await asyncio.to_thread(toolbox.runner, mode, getattr(request, "session_hash", None), client)
    except ValueError as error:
        raise InvalidRequest(str(error)) from None


async def _chat_turn(backend: ChatBackend, messages: list[dict], params: SamplingParams):
    """Chat mode: (reply text, statistics line) updates; a failed generation's ``Finished`` last."""
    reply = ""
    async with aclosing(backend.stream_chat(messages, params)) as stream:
        async for event in stream:
            if isinstance(event, Queued):
                yield [], queue_status(event.position)  # [] adds no chat message
            elif isinstance(event, TextDelta):
                reply += event.text
                yield reply, ""
            elif isinstance(event, Finished) and event.reason == "error":
                yield event
            elif isinstance(event, Finished):
                yield reply, stats_markdown(event)


async def _agent_turn(backend: ChatBackend, messages: list[dict], params: SamplingParams, runner):
    """Tools / Code interpreter mode: (the turn's messages, statistics line) updates, through the tool loop."""
    turn = TurnView()
    stats = ""
    async with aclosing(run_agent(backend, messages, params, runner)) as events:
        async for event in events:
            if isinstance(event, Queued):
                yield turn.messages, queue_status(event.position)
                continue
            if isinstance(event, Finished):
                if event.reason == "error":
                    yield event
                    return
                stats = stats_markdown(event)
            elif isinstance(event, StepFinished):
                turn.apply(event, images=[_image_file(png) for png in event.step.images])
            else:
                turn.apply(event)
            yield [dict(m) for m in turn.messages], stats


def _image_file(png: bytes) -> str:
    """A code interpreter image as a file in Gradio's cache (cleaned with it), for the chat to show."""
    return save_bytes_to_cache(png, "image.png", get_upload_folder())


def passed_as_sent(component: gr.components.Component) -> gr.components.Component:
    """``component`` with its value reaching the chat function as sent. Gradio's own range check of a
    slider or number box does not say which option is wrong (and a string fails without a message);
    ``SamplingParams`` checks every value against the same declared range and names the option."""
    component.preprocess = lambda payload: payload
    return component


def sampling_controls(max_new_tokens: int) -> list[gr.components.Component]:
    """The sampling inputs in ``make_chat_fn``'s order, each built from ``generation.option``."""

    def slider(name: str, elem_id: str, maximum=None):
        spec = option(name)
        maximum = spec.maximum if maximum is None else maximum
        return passed_as_sent(gr.Slider(spec.minimum, maximum, value=min(spec.default, maximum), step=spec.step,
                                        label=spec.label, info=spec.description, render=False, elem_id=elem_id))

    seed = option("seed")
    return [
        slider("temperature", "temperature"),
        slider("top_p", "top-p"),
        slider("max_new_tokens", "max-new-tokens", min(max_new_tokens, option("max_new_tokens").maximum)),
        slider("top_k", "top-k"),
        slider("repetition_penalty", "repetition-penalty"),
        # no minimum/maximum here: SamplingParams checks the value and says what is allowed
        passed_as_sent(gr.Number(-1, label=f"{seed.label} (-1 = random)", info=seed.description, precision=0,
                                 render=False, elem_id="seed")),
    ]


def _download_js(filename: str, mime: str) -> str:
    """Front-end step that saves the text it is given as ``filename``."""
    return f"""(text) => {{
  const url = URL.createObjectURL(new Blob([text ?? ""], {{type: "{mime};charset=utf-8"}}));
  const link = Object.assign(document.createElement("a"), {{href: url, download: "{filename}"}});
  document.body.appendChild(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
  return [];
}}"""


def _download_button(label: str, elem_id: str, render_text, chatbot: gr.Chatbot, filename: str, mime: str):
    button = gr.Button(label, size="sm", elem_id=elem_id)
    text = gr.Textbox(visible=False)
    button.click(render_text, [chatbot], [text], queue=False, show_progress="hidden",
                 api_visibility="undocumented").then(None, [text], None, js=_download_js(filename, mime))
    return button


def _chat_steps(page: gr.Blocks, chat: gr.ChatInterface, chat_fn) -> dict[str, list[int]]:
    """Ids of ChatInterface's own event steps that the page adds steps after: "showing" the user's message,
    "generating" the reply (one per way to start a turn) and "undo"."""
    steps = {"showing": [], "generating": [], "undo": []}
    chatbot_id = chat.chatbot._id
    for fn_id, block_fn in page.fns.items():
        fn = block_fn.fn
        method = getattr(fn, "__func__", None) if getattr(fn, "__self__", None) is chat else None
        if method is gr.ChatInterface._append_message_to_history:
            steps["showing"].append(fn_id)
        elif getattr(fn, "__wrapped__", None) is chat_fn and getattr(fn, "__name__", "") == "_submit_fn":
            steps["generating"].append(fn_id)
        elif method is gr.ChatInterface._pop_last_user_message and (chatbot_id, "undo") in [
                (getattr(block, "_id", block), event) for block, event, *_ in block_fn.targets]:
            steps["undo"].append(fn_id)
    missing = [name for name, ids in steps.items() if not ids]
    if missing:
        raise RuntimeError(f"gr.ChatInterface changed: its {', '.join(missing)} step was not found")
    return steps


def _give_input_back(chat: gr.ChatInterface, steps: dict[str, list[int]], stats: gr.Markdown,
                     failures: TurnFailures, placeholder: str) -> None:
    """After a failed turn: the chat as it was before it, its message back in the input box, the error shown.

    Gradio runs ChatInterface's ``.then`` steps (which re-enable the input box) after a success or a
    Stop but not after an error; these ``.failure`` steps do it. A Stop counts as a failure too, and
    then Gradio's own steps keep the stopped reply: only the input box and the statistics line are reset.
    """
    idle = {"interactive": True, "submit_btn": True, "stop_btn": False, "placeholder": placeholder}

    def restore(message, history, error):
        return history, gr.Textbox(value=printable(message), **idle), f"⚠️ {printable(error)}"

    def after_generating(message, history, request: gr.Request):
        error = failures.pop(request)
        if error is None:  # stopped: the stopped reply stays, a "waiting for a slot" line goes
            return gr.skip(), gr.Textbox(**idle), ""
        return restore(message, history, error)

    def after_showing(message, history, request: gr.Request):
        return restore(message, history, failures.pop(request) or "The message could not be shown; try again.")

    inputs, outputs = [chat.saved_input, chat.chatbot_state], [chat.chatbot, chat.textbox, stats]
    for step_ids, handler in ((steps["showing"], after_showing), (steps["generating"], after_generating)):
        for step_id in step_ids:
            Dependency(None, {}, step_id, None).failure(handler, inputs, outputs, queue=False, show_progress="hidden",
                                                        api_visibility="undocumented")


def _keep_in_browser(page: gr.Blocks, chat: gr.ChatInterface, state_secret: str | None, undo_steps: list[int]):
    """Keep the conversation in the browser's storage and restore it when the page loads.

    Nothing ever overwrites a stored conversation with an empty one except Clear, and an Undo of the
    only exchange: not a restore that found nothing readable (the default value None is never
    written), and not the empty Chatbot's change event when the page loads.
    """
    chatbot = chat.chatbot
    saved = gr.BrowserState(None, storage_key=STORAGE_KEY,
                            secret=state_secret if state_secret is not None else browser_state_secret())

    def store(history):
        return history if history else gr.skip()

    # ChatInterface updates its history State without the queue, which fires no State.change;
    # the Chatbot's own change event does (always_last: once a burst of streamed chunks settles).
    chatbot.change(store, [chatbot], [saved], queue=False, trigger_mode="always_last", show_progress="hidden",
                   api_visibility="undocumented")
    chatbot.clear(lambda: [], None, [saved], queue=False, api_visibility="undocumented")
    for step_id in undo_steps:  # after Undo has removed the last exchange
        Dependency(None, {}, step_id, None).success(lambda history: gr.skip() if history else [], [chatbot], [saved],
                                                    queue=False, show_progress="hidden",
                                                    api_visibility="undocumented")

    def restore(history):
        if not isinstance(history, list) or not history:  # nothing readable: show nothing, write nothing
            return gr.skip(), gr.skip()
        return history, history

    page.load(restore, [saved], [chatbot, chat.chatbot_state], queue=False, api_visibility="undocumented")


def build_page(backend: ChatBackend, branding: Branding, *, max_new_tokens: int = 2048,
               state_secret: str | None = None, toolbox=None) -> gr.Blocks:
    """The chat page. ``state_secret`` encrypts the conversation kept in the browser; by default
    ``browser_secret.browser_state_secret()`` ($CHATGLM_WEB_STATE_SECRET or a key file made once).
    ``toolbox`` (``toolbox.Toolbox``) adds the Tools and, when it has a sandbox, Code interpreter modes."""
    remove_legacy_downloads()
    failures = TurnFailures()
    chat_fn = make_chat_fn(backend, failures, toolbox)
    modes = toolbox.modes if toolbox is not None else (CHAT,)
    with gr.Blocks(title=branding.title, analytics_enabled=False, fill_height=True,
                   delete_cache=DELETE_CACHE) as page:
        gr.HTML(branding.header_html(), elem_id="brand-header")
        gr.Markdown(header_markdown(backend), elem_id="model-info")
        mode = gr.Radio(list(modes), value=CHAT, label="Mode", elem_id="mode", visible=len(modes) > 1,
                        info=mode_info(modes))
        stats = gr.Markdown("", elem_id="reply-stats", render=False)
        # A small offline demo model answers better with its own default system prompt.
        default_system = "" if backend.info.offline_demo else branding.system_prompt
        system_prompt = gr.Textbox(default_system, label="System prompt (Chat mode)", lines=2, render=False,
                                   elem_id="system-prompt")
        chatbot = gr.Chatbot(
            label=branding.title, elem_id="chatbot", height="55vh", latex_delimiters=LATEX,
            buttons=["copy", "copy_all"], sanitize_html=True, render_markdown=True,
            placeholder=branding.placeholder, editable="user", feedback_options=None,
        )
        chat = gr.ChatInterface(
            chat_fn,
            chatbot=chatbot,
            textbox=gr.Textbox(placeholder=branding.input_placeholder, elem_id="chat-input", show_label=False,
                               submit_btn=True, stop_btn=True),
            additional_inputs=[system_prompt, *sampling_controls(max_new_tokens), mode],
            additional_outputs=[stats],
            additional_inputs_accordion=gr.Accordion("Settings", open=False, render=False),
            examples=[[e] for e in branding.examples] or None,
            run_examples_on_click=True,
            cache_examples=False,
            editable=True,
            api_name="chat",
            fill_height=True,
            autofocus=True,
            validator=validate_message,
        )
        stats.render()
        steps = _chat_steps(page, chat, chat_fn)
        _give_input_back(chat, steps, stats, failures, branding.input_placeholder)
        mode_examples = [[text, name] for name, texts in (
            (TOOLS, branding.tool_examples), (INTERPRETER, branding.interpreter_examples)) if name in modes
            for text in texts]
        if mode_examples:
            gr.Examples(mode_examples, [chat.textbox, mode], label="Examples for Tools and Code interpreter "
                        "(sets the mode; press Enter to send)", elem_id="mode-examples")
        with gr.Row():
            _download_button("Download Markdown", "download-md", to_markdown, chatbot, "conversation.md",
                             "text/markdown")
            _download_button("Download JSON", "download-json", to_json, chatbot, "conversation.json",
                             "application/json")

        _keep_in_browser(page, chat, state_secret, steps["undo"])
        if toolbox is not None:
            def end_session(request: gr.Request):  # the tab was closed or reloaded: its kernel goes
                toolbox.end_session(request.session_hash)

            page.unload(end_session)
    return page


def mode_info(modes) -> str:
    """What each mode does, under the selector."""
    text = "Chat: plain conversation. Tools: the model may call the built-in tools (calculator, time, units, …)."
    if INTERPRETER in modes:
        text += (" Code interpreter: the model writes Python that is run, in a sandbox on this server, "
                 "and sees the output (⚠️ model-written code runs here).")
    return text


def launch_kwargs(branding: Branding) -> dict:
    return {"theme": branding.theme(), "css": MESSAGE_CSS + branding.css, "max_file_size": MAX_FILE_SIZE}
