"""The chat page, composed from public Gradio Blocks parts. It knows nothing about models: it talks to a
``ChatBackend`` and shows its ``ModelInfo``.

    ┌ top bar: the model that answers (name, precision · device · context) ····· [中文] [⚙ Settings] ┐
    │ banner, only for the offline demo model                                                         │
    │ the chat (the page's one scroll; examples in the visitor's language while it is empty)          │
    │ [ message box, focused on load ..................................... ] [Send | Stop]           │
    └ statistics line / errors                                                                        ┘
    drawer (right; a sheet on phones): about the model, mode, system prompt, sampling, downloads

In the DOM the message box comes right after the top bar's two buttons (CSS puts it under the chat),
so it is the third Tab stop from the top of the page, ahead of every message's buttons.

Language: labels are ``gr.I18n`` keys (the browser's language on first paint); the page's own texts and
the language switch use ``strings.text`` (every component re-labelled). Settings and the language are
kept in the browser with the conversation (``gr.BrowserState``, encrypted), and restored on load.
"""

from __future__ import annotations

import html
import json
import logging
from contextlib import aclosing

import gradio as gr

from ..branding import Branding
from ..browser_secret import browser_state_secret
from ..generation import ChatBackend, ModelInfo, option
from ..settings import DEFAULT_MODEL
from ..toolbox import CHAT, INTERPRETER, TOOLS
from ..transcript import remove_legacy_downloads, to_json, to_markdown
from . import turns
from .chat import make_chat_fn
from .strings import I18N, LANGUAGE_NAMES, LANGUAGES, i18n, language_of, text

log = logging.getLogger(__name__)

LATEX = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "$", "right": "$", "display": False},
    {"left": "\\(", "right": "\\)", "display": False},
    {"left": "\\[", "right": "\\]", "display": True},
]
STORAGE_KEY = "chatglm-web-conversation"
SETTINGS_KEY = "chatglm-web-settings"
#: Largest upload Gradio takes (the page has no upload control, and the HTTP guard refuses uploads anyway).
MAX_FILE_SIZE = "1mb"
#: (every, older than) in seconds: how often Gradio deletes the files in its cache, and which.
DELETE_CACHE = (600, 600)
SAMPLING = ("temperature", "top_p", "max_new_tokens", "top_k", "repetition_penalty")
FOCUS_INPUT_JS = """() => {
  const box = () => document.querySelector('#chat-input textarea');
  const focus = (tries) => {
    const el = box();
    if (el && (document.activeElement === document.body || document.activeElement === null)) el.focus();
    else if (!el && tries > 0) requestAnimationFrame(() => focus(tries - 1));
  };
  focus(600);
}"""
REFOCUS_JS = "() => { document.querySelector('#chat-input textarea')?.focus(); }"


def model_title(info: ModelInfo) -> str:
    """The answering model's short name: the last part of a Hub id or folder, without a note in brackets."""
    name = info.name.split(" (")[0].rstrip("/")
    return name.split("/")[-1] or info.name


def top_bar_html(info: ModelInfo, lang: str) -> str:
    subtitle = text("subtitle", lang, precision=info.precision, device=info.device,
                    context=f"{info.context_length:,}")
    return (f'<div class="topbar-title"><h1>{html.escape(model_title(info))}</h1>'
            f'<p class="topbar-subtitle">{html.escape(subtitle)}</p></div>')


def banner_html(info: ModelInfo, lang: str) -> str:
    if not info.offline_demo:
        return ""
    words = text("demo_banner", lang, model=model_title(info), wanted=DEFAULT_MODEL.split("/")[-1])
    return f'<p class="demo-banner" role="status">{html.escape(words)}</p>'


def details_markdown(info: ModelInfo, lang: str) -> str:
    return text("details", lang, model=info.name, precision=info.precision, device=info.device,
                context=f"{info.context_length:,}")


class Labels:
    """Which text of which component is which string, declared once: ``gr.I18n`` keys when the page is
    built, and the updates that re-label it all in one language (the language switch, a stored choice)."""

    def __init__(self):
        self.entries: list[tuple[gr.components.Component, dict]] = []

    def __call__(self, component, **props):
        """``props``: property -> strings key, or a function of the language."""
        self.entries.append((component, props))
        return component

    def updates(self, lang: str) -> dict:
        found = {}
        for component, props in self.entries:
            values = {prop: key(lang) if callable(key) else text(key, lang) for prop, key in props.items()}
            found.setdefault(component, {}).update(values)
        return found

    @property
    def components(self) -> list:
        return list(dict.fromkeys(component for component, _ in self.entries))


def _slider(labels: Labels, name: str, maximum=None) -> gr.Slider:
    spec = option(name)
    maximum = spec.maximum if maximum is None else maximum
    return labels(gr.Slider(spec.minimum, maximum, value=min(spec.default, maximum), step=spec.step,
                            label=i18n(name), info=i18n(f"{name}_info"), elem_id=name.replace("_", "-")),
                  label=name, info=f"{name}_info")


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


def _download_button(labels: Labels, key: str, elem_id: str, render_text, chatbot, filename: str, mime: str):
    button = labels(gr.Button(i18n(key), size="sm", elem_id=elem_id), value=key)
    holder = gr.Textbox(visible=False)
    button.click(render_text, [chatbot], [holder], queue=False, show_progress="hidden",
                 api_visibility="undocumented").then(None, [holder], None, js=_download_js(filename, mime))
    return button


def build_page(backend: ChatBackend, branding: Branding, *, max_new_tokens: int = 2048,
               state_secret: str | None = None, toolbox=None) -> gr.Blocks:
    """The chat page. ``state_secret`` encrypts what the browser keeps; by default
    ``browser_secret.browser_state_secret()`` ($CHATGLM_WEB_STATE_SECRET or a key file made once).
    ``toolbox`` (``toolbox.Toolbox``) adds the Tools and, when it has a sandbox, Code interpreter modes,
    offered only when the model can call tools."""
    remove_legacy_downloads()
    info = backend.info
    for note in info.notes:   # for the operator, not the audience
        log.warning("%s", note)
    offered = toolbox.modes if toolbox is not None else (CHAT,)
    modes = offered if info.tools else (CHAT,)
    secret = state_secret if state_secret is not None else browser_state_secret()
    labels = Labels()

    def examples(mode: str, lang: str) -> list[dict]:
        kind = {TOOLS: "tool_examples", INTERPRETER: "interpreter_examples"}.get(mode, "examples")
        return [{"text": example} for example in branding.examples_for(kind, lang)]

    def mode_info(lang: str) -> str:
        if not info.tools and len(offered) > 1:
            return text("mode_unavailable", lang, model=model_title(info))
        return text("mode_info", lang) + (text("mode_info_interpreter", lang) if INTERPRETER in modes else "")

    def mode_choices(lang: str):
        return [(text(name, lang), name) for name in modes]

    def default_system(lang: str) -> str:   # a small demo model answers better with its own default
        return "" if info.offline_demo else branding.system_prompt_for(lang)

    with gr.Blocks(title=f"{model_title(info)} · {branding.title}", analytics_enabled=False, fill_height=True,
                   delete_cache=DELETE_CACHE) as page:
        lang = gr.State("en")
        busy = gr.State(False)
        pending = gr.State(None)
        cleared = gr.State(None)
        saved = gr.BrowserState(None, storage_key=STORAGE_KEY, secret=secret)
        saved_settings = gr.BrowserState(None, storage_key=SETTINGS_KEY, secret=secret)

        with gr.Row(elem_id="topbar", equal_height=True):
            labels(gr.HTML(top_bar_html(info, "en"), elem_id="model-title"),
                           value=lambda lg: top_bar_html(info, lg))
            switch = labels(gr.Button(LANGUAGE_NAMES["zh-CN"], size="sm", elem_id="language-switch", scale=0,
                                      min_width=64),
                            value=lambda lg: LANGUAGE_NAMES["en" if lg == "zh-CN" else "zh-CN"])
            open_drawer = labels(gr.Button(i18n("open_settings"), size="sm", elem_id="open-settings", scale=0,
                                           min_width=96), value="open_settings")
        labels(gr.HTML(banner_html(info, "en"), elem_id="banner", visible=info.offline_demo),
                        value=lambda lg: banner_html(info, lg))

        with gr.Column(elem_id="main", scale=1):
            with gr.Row(elem_id="composer", equal_height=True):
                textbox = labels(gr.Textbox(label=i18n("message_label"), show_label=False, elem_id="chat-input",
                                            placeholder=i18n("input_placeholder_plain"), lines=1,
                                            max_lines=8, autofocus=True, scale=1, container=False,
                                            html_attributes=gr.InputHTMLAttributes(enterkeyhint="send")),
                                 label="message_label",
                                 placeholder=lambda lg: text("input_placeholder", lg, model=model_title(info)))
                send = labels(gr.Button(i18n("send"), variant="primary", elem_id="send", scale=0, min_width=88),
                              value="send")
                stop_button = labels(gr.Button(i18n("stop"), variant="stop", elem_id="stop", scale=0, min_width=88,
                                               visible=False), value="stop")
            chatbot = labels(gr.Chatbot(label=i18n("chat_label"), show_label=False, elem_id="chatbot", scale=1,
                                        height="100%", latex_delimiters=LATEX, buttons=["copy"], sanitize_html=True,
                                        render_markdown=True, editable="user", feedback_options=None,
                                        placeholder=text("empty_chat", "en"), examples=examples(CHAT, "en"),
                                        autoscroll=True),
                             label="chat_label", placeholder="empty_chat")
            undo_clear_button = labels(gr.Button(i18n("undo_clear"), size="sm", elem_id="undo-clear", visible=False),
                                       value="undo_clear")
            stats = gr.Markdown("", elem_id="reply-stats")

        with labels(gr.Sidebar(label=i18n("settings"), open=False, position="right", elem_id="settings-drawer",
                               width=360), label="settings") as drawer:
            labels(gr.Markdown(details_markdown(info, "en"), elem_id="model-details"),
                             value=lambda lg: details_markdown(info, lg))
            mode = labels(gr.Radio(mode_choices("en"), value=CHAT, label=i18n("mode"), info=mode_info("en"),
                                   elem_id="mode", interactive=len(modes) > 1, visible=len(offered) > 1),
                          label="mode", info=mode_info, choices=mode_choices)
            system_prompt = labels(gr.Textbox(default_system("en"), label=i18n("system_prompt"), lines=2,
                                              info=i18n("system_prompt_info"), elem_id="system-prompt"),
                                   label="system_prompt", info="system_prompt_info")
            sliders = {name: _slider(labels, name, min(max_new_tokens, option(name).maximum)
                                     if name == "max_new_tokens" else None) for name in SAMPLING}
            seed = labels(gr.Number(-1, label=i18n("seed"), info=i18n("seed_info"), precision=0, elem_id="seed"),
                          label="seed", info="seed_info")
            with gr.Group():
                labels(gr.Markdown(f"**{text('downloads', 'en')}**", elem_id="downloads-title"),
                       value=lambda lg: f"**{text('downloads', lg)}**")
                with gr.Row():
                    _download_button(labels, "download_md", "download-md", to_markdown, chatbot, "conversation.md",
                                     "text/markdown")
                    _download_button(labels, "download_json", "download-json", to_json, chatbot,
                                     "conversation.json", "application/json")

        settings = [system_prompt, *sliders.values(), seed, mode]
        setting_names = ["system_prompt", *SAMPLING, "seed", "mode"]
        _wire_turns(page, backend, toolbox, lang, busy, pending, saved, chatbot, textbox, send, stop_button, stats,
                    settings)
        _wire_clear(chatbot, saved, cleared, undo_clear_button)

        # -- settings and language: kept in the browser, restored on load ----------------------------------
        def settings_dict(current_lang, *values):
            return {"lang": current_lang, **dict(zip(setting_names, values))}

        for component in settings:   # every change, also the ones restore and the language switch make
            component.change(settings_dict, [lang, *settings], [saved_settings], queue=False, show_progress="hidden",
                             trigger_mode="always_last", api_visibility="undocumented")

        def relabelled(current_lang, mode_value, system_value) -> dict:
            updates = labels.updates(current_lang)
            updates[chatbot]["examples"] = examples(mode_value, current_lang)
            other = "en" if current_lang == "zh-CN" else "zh-CN"
            if system_value == default_system(other):   # the default prompt follows the language
                updates[system_prompt]["value"] = default_system(current_lang)
            return {component: gr.update(**props) for component, props in updates.items()}

        def switch_language(current_lang, *values):
            new = "en" if current_lang == "zh-CN" else "zh-CN"
            updates = relabelled(new, values[-1], values[0])
            stored = settings_dict(new, *values)
            if system_prompt in updates and "value" in updates[system_prompt]:
                stored["system_prompt"] = updates[system_prompt]["value"]
            return {lang: new, saved_settings: stored, **updates}

        relabel_outputs = labels.components
        switch.click(switch_language, [lang, *settings], _unique([lang, saved_settings, *relabel_outputs]), queue=False,
                     show_progress="hidden", api_visibility="undocumented")
        mode.change(lambda value, current_lang: gr.Chatbot(examples=examples(value, current_lang)), [mode, lang],
                    [chatbot], queue=False, show_progress="hidden", api_visibility="undocumented")
        open_drawer.click(lambda: gr.Sidebar(open=True), None, [drawer], queue=False, show_progress="hidden",
                          api_visibility="undocumented")

        def restore(history, stored, request: gr.Request):
            stored = stored if isinstance(stored, dict) else {}
            chosen = stored.get("lang")
            if chosen not in LANGUAGES:
                chosen = language_of(request.headers.get("accept-language") if request else None)
            values = {name: stored[name] for name in setting_names if name in stored}
            updates = relabelled(chosen, values.get("mode", CHAT) if values.get("mode") in modes else CHAT,
                                 values.get("system_prompt", default_system("en")))
            for component, name in zip(settings, setting_names):
                if name in values and _fits(component, values[name], modes):
                    updates[component] = gr.update(**{**updates.get(component, {}), "value": values[name]})
            if isinstance(history, list) and history:   # nothing readable: show nothing, write nothing
                updates[chatbot] = gr.update(**{**updates.get(chatbot, {}), "value": history})
            return {lang: chosen, **updates}

        page.load(restore, [saved, saved_settings], _unique([lang, chatbot, *relabel_outputs, *settings]), queue=False,
                  show_progress="hidden", api_visibility="undocumented")

        # -- the /chat API endpoint (API clients only; stateless per call apart from its session's history) --
        _api_endpoint(backend, toolbox)
        if toolbox is not None:
            def end_session(request: gr.Request):  # the tab was closed or reloaded: its kernel goes
                toolbox.end_session(request.session_hash)

            page.unload(end_session)
    return page


def _unique(components: list) -> list:
    return list(dict.fromkeys(components))


def _fits(component, value, modes) -> bool:
    """Whether a stored setting may be put back as it is (the server's limits may have changed since)."""
    if isinstance(component, gr.Radio):
        return value in modes
    if isinstance(component, gr.Slider):
        return isinstance(value, (int, float)) and component.minimum <= value <= component.maximum
    if isinstance(component, gr.Number):
        return isinstance(value, (int, float))
    return isinstance(value, str)


def _wire_turns(page, backend, toolbox, lang, busy, pending, saved, chatbot, textbox, send, stop_button, stats,
                settings) -> None:
    """Send / Enter / an example / Retry / Edit all begin a turn the same way; Stop ends any of them."""
    controls = [busy, send, stop_button]
    before = gr.State(None)   # the conversation before the turn being begun
    quiet = dict(queue=False, show_progress="hidden", api_visibility="undocumented")
    stops = turns.StopSignals()

    async def respond(pending_message, history, system_prompt, temperature, top_p, max_new_tokens, top_k,
                      repetition_penalty, seed, mode, current_lang, request: gr.Request):
        async with aclosing(turns.respond(pending_message, history, system_prompt, temperature, top_p,
                                          max_new_tokens, top_k, repetition_penalty, seed, mode, current_lang,
                                          toolbox=toolbox, backend=backend, stops=stops,
                                          request=request)) as updates:   # a visitor who leaves ends it
            async for update in updates:
                yield update

    def finish(history, request: gr.Request):
        stops.forget(getattr(request, "session_hash", None))   # a Stop that came too late
        return turns.finish(history)

    begin = turns.Begin(turns.Refusals())
    starts = [
        (textbox.submit, begin.send, [textbox, chatbot, busy, lang]),
        (send.click, begin.send, [textbox, chatbot, busy, lang]),
        (chatbot.example_select, begin.example, [chatbot, busy, lang]),
        (chatbot.retry, begin.retry, [chatbot, busy, lang]),
        (chatbot.edit, begin.edit, [chatbot, busy, lang]),
    ]
    for trigger, begin_turn, inputs in starts:
        began = trigger(begin_turn, inputs, [before, pending], **quiet)
        began.failure(begin.refused, [lang], [stats], **quiet)   # refused: why, in the statistics line
        shown = began.success(turns.show, [before, pending], [chatbot, textbox, stats, *controls], **quiet)
        reply = shown.success(respond, [pending, chatbot, *settings, lang], [chatbot, stats, textbox],
                              show_progress="hidden", api_visibility="undocumented")
        reply.then(finish, [chatbot], [chatbot, *controls, saved], **quiet).then(None, js=REFOCUS_JS)
    stop_button.click(turns.stopper(stops), None, None, **quiet)
    chatbot.undo(turns.undo, [chatbot, busy], [chatbot, textbox, saved], **quiet)
    # mid-reply, what is kept says "interrupted" (a reload then shows the partial reply for what it is)
    chatbot.change(turns.store_while_streaming, [chatbot, busy, lang], [saved], trigger_mode="always_last", **quiet)


def _wire_clear(chatbot, saved, cleared, undo_clear_button) -> None:
    quiet = dict(queue=False, show_progress="hidden", api_visibility="undocumented")
    chatbot.clear(turns.clear, [saved], [saved, cleared, undo_clear_button], **quiet)
    undo_clear_button.click(turns.undo_clear, [cleared], [chatbot, saved, cleared, undo_clear_button], **quiet)


def _api_endpoint(backend, toolbox) -> None:
    """``/chat``: (message, system prompt, temperature, top_p, max_new_tokens, top_k, repetition_penalty, seed,
    mode) -> streamed (reply, statistics line). A Gradio client may leave out every argument after the message
    (its default is the page's). The conversation continues within the client's session (as a Gradio
    client keeps it). The inputs are plain JSON, so every value reaches ``SamplingParams`` as sent, which
    names a wrong option and says what is allowed."""
    chat_fn = make_chat_fn(backend, toolbox)
    # (gr.JSON reads a string value as JSON text, so the string defaults are written as JSON)
    defaults = {"system_prompt": '""', **{name: option(name).default for name in SAMPLING}, "seed": -1,
                "mode": f'"{CHAT}"'}
    with gr.Group(visible=False):
        message = gr.Textbox(label="message")
        inputs = [gr.JSON(json.dumps(value) if not isinstance(value, str) else value, label=name)
                  for name, value in defaults.items()]
        reply, stats = gr.JSON(label="reply"), gr.Markdown()
        session_history = gr.State([])
        trigger = gr.Button()

    async def chat(message_text, system_prompt, temperature, top_p, max_new_tokens, top_k, repetition_penalty, seed,
                   mode, history, request: gr.Request):
        history = history or []
        # aclosing: a client that leaves closes this generator, and with it the generation
        async with aclosing(chat_fn(message_text, history, system_prompt or "", temperature, top_p, max_new_tokens,
                                    top_k, repetition_penalty, seed, CHAT if mode is None else mode,
                                    request=request)) as updates:
            async for answer, line in updates:
                # the exchange so far joins the session's conversation
                said = [{"role": "assistant", "content": answer}] if isinstance(answer, str) else list(answer)
                yield answer, [*history, {"role": "user", "content": message_text}, *said], line

    trigger.click(chat, [message, *inputs, session_history], [reply, session_history, stats], api_name="chat",
                  postprocess=False, show_progress="hidden")


def theme(branding: Branding) -> gr.themes.Base:
    """The branding's theme with text colours that meet WCAG AA (4.5:1) in light and dark mode."""
    return branding.theme().set(
        button_primary_background_fill="*primary_600", button_primary_background_fill_hover="*primary_700",
        button_primary_background_fill_dark="*primary_600", button_primary_background_fill_hover_dark="*primary_700",
        checkbox_label_background_fill_selected="*primary_600",
        checkbox_label_background_fill_selected_dark="*primary_600",
        body_text_color_subdued="*neutral_600", body_text_color_subdued_dark="*neutral_300",
        block_info_text_color="*neutral_600", block_info_text_color_dark="*neutral_300",
        input_placeholder_color="*neutral_600", input_placeholder_color_dark="*neutral_300",
        block_label_text_color="*neutral_700", block_label_text_color_dark="*neutral_200",
        block_title_text_color="*neutral_800", block_title_text_color_dark="*neutral_100",
    )


def launch_kwargs(branding: Branding) -> dict:
    from .style import PAGE_CSS

    # The page's CSS goes in <head> as it is (Gradio scopes ``css`` to its container, and the footer and the
    # container itself are outside that scope); the branding's CSS is scoped as usual.
    return {"theme": theme(branding), "css": branding.css, "head": f"<style>{PAGE_CSS}</style>",
            "max_file_size": MAX_FILE_SIZE, "i18n": I18N, "footer_links": ["api", "gradio"], "js": FOCUS_INPUT_JS}
