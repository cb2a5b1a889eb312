"""The chat page, composed from public Gradio Blocks parts. It knows nothing about models: it talks to a
``ChatBackend`` and shows its ``ModelInfo``.

    list (left; open beside the chat on wide windows, a sheet on phones): New, search, the conversations,
    │   this conversation (title, share link, delete, downloads), export all, import
    ┌ top bar: the model that answers (name, precision · device · context) ····· [中文] [⚙ Settings] ┐
    │ banner, only for the offline demo model; a shared conversation's banner, Replay, Continue       │
    │ the chat (the page's one scroll; examples in the visitor's language while it is empty)          │
    │ [ message box, focused on load ..................................... ] [Send | Stop]           │
    │ token meter ·································································· [What the model sees] │
    └ statistics line / errors                                                                        ┘
    drawer (right; a sheet on phones): about the model, mode, system prompt, sampling, the exact prompt

In the DOM the message box comes right after the top bar's two buttons (CSS puts it under the chat, and
the list is declared after the chat), so it is the third Tab stop from the top of the page.

State: the tab's conversation is a tree on the server (``p.tree``, ``conversations/tree.py``); the chat
shows it (``conversation_view.py``). Every change ends with ``ConversationList.saving``: the browser's
stored copy is read (``store.js``), merged, sealed and written back, one conversation per entry.

Language: labels are ``gr.I18n`` keys (the browser's language on first paint); the page's own texts and
the language switch use ``strings.text`` (every component re-labelled). Settings and the language are
kept in the browser (``gr.BrowserState``, encrypted), and restored on load.
"""

from __future__ import annotations

import html
import json
import logging
from contextlib import aclosing
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from chatglm_web.branding import Branding
from chatglm_web.browser_secret import browser_state_key, browser_state_secret
from chatglm_web.generation import ChatBackend, ModelInfo, SamplingParams, option
from chatglm_web.settings import DEFAULT_MODEL
from chatglm_web.conversations.browser_store import BrowserStore, ops
from chatglm_web.conversations.legacy_storage import CONVERSATION_KEY as LEGACY_CONVERSATION_KEY, open_browser_state
from chatglm_web.conversations.share import ShareLinks
from chatglm_web.conversations.tree import Conversation, from_history
from chatglm_web.tools.toolbox import CHAT, INTERPRETER, TOOLS
from chatglm_web.conversations.transcript import remove_legacy_downloads, to_markdown
from chatglm_web.page import turns
from chatglm_web.page.chat import make_chat_fn
from chatglm_web.page.conversation_list import (ALL_JS, CURRENT_JS, FORGIVE_JS, PICK_JS, QUIET, READ_CHOSEN_JS, SNAPSHOT_JS, ConversationList, count_line,
                                list_update, rows_state, saved_note)
from chatglm_web.page.attachments import ATTACH_JS, DETACH_JS, DOCUMENTS_JS, PageDocuments
from chatglm_web.page.document_chips import button_html
from chatglm_web.page.conversation_view import is_nav, view
from chatglm_web.page.markers import ending_of
from chatglm_web.page.meter import DEBOUNCE_JS, make_meter
from chatglm_web.page.sharing import LINK_JS, Sharing, model_title_of
from chatglm_web.page.sharing import banner_html as shared_banner_html
from chatglm_web.page.strings import I18N, LANGUAGE_NAMES, LANGUAGES, i18n, language_of, text

log = logging.getLogger(__name__)

LATEX = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "$", "right": "$", "display": False},
    {"left": "\\(", "right": "\\)", "display": False},
    {"left": "\\[", "right": "\\]", "display": True},
]
#: Where versions before the conversation list kept their one conversation (read once, moved into the list).
STORAGE_KEY = LEGACY_CONVERSATION_KEY
SETTINGS_KEY = "chatglm-web:settings"
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
READONLY_CLASS = "readonly"
VERSION_JS = "(request, ...rest) => [window.chatglmStore.pendingVersion, ...rest]"
STORE_JS = Path(__file__).with_name("store.js").read_text(encoding="utf-8")


def model_title(info: ModelInfo) -> str:
    """The answering model's short name: the last part of a Hub id or folder, without a note in brackets."""
    return model_title_of(info.name)


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


def _download_button(labels: Labels, key: str, elem_id: str, render_text, source, holder, filename: str, mime: str):
    button = labels(gr.Button(i18n(key), size="sm", elem_id=elem_id), value=key)
    button.click(render_text, [source], [holder], **QUIET).then(None, [holder], None, js=_download_js(filename, mime),
                                                                 **QUIET)
    return button


def build_page(backend: ChatBackend, branding: Branding, *, max_new_tokens: int = 2048,
               state_secret: str | None = None, toolbox=None, listed_chat_api: bool = True) -> gr.Blocks:
    """The chat page. ``state_secret`` seals what the browser keeps and what share links carry; by default
    ``browser_secret.browser_state_secret()`` ($CHATGLM_WEB_STATE_SECRET or a key file made once).
    ``toolbox`` (``toolbox.Toolbox``) adds the Tools and, when it has a sandbox, Code interpreter modes,
    offered only when the model can call tools. ``listed_chat_api=False``: the ``/chat`` endpoint stays
    callable but is left off the API page (and so off the MCP server's tools, see ``api.mcp``)."""
    remove_legacy_downloads()
    info = backend.info
    for note in info.notes:   # for the operator, not the audience
        log.warning("%s", note)
    offered = toolbox.modes if toolbox is not None else (CHAT,)
    modes = offered if info.tools else (CHAT,)
    secret = state_secret if state_secret is not None else browser_state_secret()
    store = BrowserStore(secret)
    sharing = Sharing(ShareLinks(secret), backend, toolbox)
    labels = Labels()
    p = SimpleNamespace()

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
        p.lang = gr.State("en")
        p.documents = PageDocuments(backend, toolbox)   # documents attached in each browser session (📎)
        p.busy = gr.State(False)
        p.plan = gr.State(None)
        # (not a callable default: Gradio would call it in a load step of its own, which could run after ``restore``
        # and replace the restored conversation with an empty one)
        p.tree = gr.State(None)  # this tab's conversation (conversations/tree.py): the truth
        p.shown = gr.State([])           # which tree node each of the chat's messages shows
        p.rows = gr.State([])            # the conversation list as last read from the browser
        p.deleted = gr.State(None)       # the conversation Delete took, until Undo or the next delete
        p.readonly = gr.State(False)     # a share link's view
        p.shared_about = gr.State({})    # what the shared conversation was made with
        p.wide = gr.State(False)         # a wide window: the list stays open beside the chat (a sheet on phones)
        # (Gradio serves a BrowserState's secret to every visitor: it gets a key derived one way from the state
        # secret, which seals share links and stored conversations and so never leaves the server)
        saved_settings = gr.BrowserState(None, storage_key=SETTINGS_KEY, secret=browser_state_key(secret))
        with gr.Group(visible=False):
            p.stored_in = gr.JSON(None)  # what store.js read, for the step it precedes
            p.store_ops = gr.JSON(None)  # what a step wants store.js to write
            holder = gr.Textbox()
            share_token = gr.Textbox()
            picked_document = gr.JSON(None)      # what documents.js read of a picked file
            removed_document = gr.Textbox()      # the pending chip whose ✕ was pressed

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
        p.share_banner = gr.HTML("", elem_id="share-banner", visible=False)
        with gr.Row(elem_id="share-actions", visible=False) as share_actions:
            replay = labels(gr.Button(i18n("replay"), size="sm", elem_id="replay", scale=0), value="replay")
            continue_shared = labels(gr.Button(i18n("continue_shared"), size="sm", variant="primary",
                                               elem_id="continue-shared", scale=0), value="continue_shared")
        replay_result = gr.HTML("", elem_id="replay-result", visible=False)

        with gr.Column(elem_id="main", scale=1):
            with gr.Column(elem_id="composer-area") as composer_area:
                with gr.Row(elem_id="composer", equal_height=True):
                    textbox = labels(gr.Textbox(label=i18n("message_label"), show_label=False, elem_id="chat-input",
                                                placeholder=i18n("input_placeholder_plain"), lines=1,
                                                max_lines=8, autofocus=True, scale=1, container=False,
                                                html_attributes=gr.InputHTMLAttributes(enterkeyhint="send")),
                                     label="message_label",
                                     placeholder=lambda lg: text("input_placeholder", lg, model=model_title(info)))
                    labels(gr.HTML(button_html("en"), elem_id="attach", scale=0, min_width=44),
                           value=button_html)
                    send = labels(gr.Button(i18n("send"), variant="primary", elem_id="send", scale=0, min_width=88),
                                  value="send")
                    stop_button = labels(gr.Button(i18n("stop"), variant="stop", elem_id="stop", scale=0,
                                                   min_width=88, visible=False), value="stop")
                p.attached = gr.HTML("", elem_id="attachments")   # the pending documents' chips
                with gr.Row(elem_id="meter-row", equal_height=True):
                    meter_line = gr.HTML("", elem_id="token-meter")
                    view_prompt = labels(gr.Button(i18n("view_prompt"), size="sm", elem_id="view-prompt", scale=0,
                                                   min_width=64), value="view_prompt")
            chatbot = labels(gr.Chatbot(label=i18n("chat_label"), show_label=False, elem_id="chatbot", scale=1,
                                        height="100%", latex_delimiters=LATEX, buttons=["copy"], sanitize_html=True,
                                        render_markdown=True, editable="user", feedback_options=None,
                                        placeholder=text("empty_chat", "en"), examples=examples(CHAT, "en"),
                                        autoscroll=True, group_consecutive_messages=False),
                             label="chat_label", placeholder="empty_chat")
            p.stats = gr.Markdown("", elem_id="reply-stats")
            version_go = gr.Button("versions", elem_id="version-go", elem_classes=["hidden-helper"])
            list_refresh = gr.Button("list", elem_id="list-refresh", elem_classes=["hidden-helper"])

        with labels(gr.Sidebar(label=i18n("conversations"), open=False, position="left",
                               elem_id="conversations-sidebar", width=280), label="conversations") as sidebar:
            new_chat = labels(gr.Button(i18n("new_chat"), variant="primary", elem_id="new-chat"), value="new_chat")
            p.search = labels(gr.Textbox(show_label=False, label=i18n("search_conversations"), container=False,
                                         placeholder=i18n("search_conversations"), elem_id="search-conversations"),
                              label="search_conversations", placeholder="search_conversations")
            p.conversation_list = labels(gr.Radio([], value=None, show_label=False, label=i18n("conversations"),
                                                  elem_id="conversation-list", container=False),
                                         label="conversations")
            p.list_note = gr.Markdown("", elem_id="list-note")
            p.undo_delete = labels(gr.Button(i18n("undo_delete"), size="sm", elem_id="undo-delete", visible=False),
                                   value="undo_delete")
            with labels(gr.Accordion(i18n("this_conversation"), open=True, elem_id="this-conversation"),
                        label="this_conversation"):
                p.title_box = labels(gr.Textbox(label=i18n("conversation_title"), elem_id="conversation-title",
                                                info=i18n("conversation_title_info"), max_length=200),
                                     label="conversation_title", info="conversation_title_info")
                with gr.Row():
                    share = labels(gr.Button(i18n("share"), size="sm", elem_id="share"), value="share")
                    delete = labels(gr.Button(i18n("delete_conversation"), size="sm", variant="stop",
                                              elem_id="delete-conversation"), value="delete_conversation")
                p.share_link = labels(gr.Textbox(label=i18n("share_link"), elem_id="share-link", visible=False,
                                                 buttons=["copy"], interactive=False),
                                      label="share_link")
                with gr.Row():
                    _download_button(labels, "download_md", "download-md", _markdown_of, p.tree, holder,
                                     "conversation.md", "text/markdown")
                    _download_button(labels, "download_json", "download-json", _json_of, p.tree, holder,
                                     "conversation.json", "application/json")
            with gr.Row():
                export_all = labels(gr.Button(i18n("export_all"), size="sm", elem_id="export-all"), value="export_all")
                import_all = labels(gr.Button(i18n("import"), size="sm", elem_id="import"), value="import")

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
            with labels(gr.Accordion(i18n("view_prompt"), open=False, elem_id="prompt-accordion"),
                        label="view_prompt") as prompt_accordion:
                prompt_text = labels(gr.Code("", label=i18n("prompt_text"), elem_id="prompt-text", interactive=False,
                                             wrap_lines=True, max_lines=30), label="prompt_text")

        settings = [system_prompt, *sliders.values(), seed, mode]
        setting_names = ["system_prompt", *SAMPLING, "seed", "mode"]
        p.chatbot, p.textbox = chatbot, textbox
        quiet = QUIET

        def show_conversation(tree, lang):
            chat, shown = turns.chat_update(tree, lang, False)
            return {chatbot: chat, p.shown: shown, p.stats: ""}

        lists = ConversationList(store, p, show_conversation)
        meter = make_meter(backend, toolbox, p.documents)
        meter_inputs = [textbox, p.tree, *settings, p.lang]

        def measuring(dependency):
            return dependency.then(meter, meter_inputs, [meter_line, prompt_text], **quiet)

        # -- turns ------------------------------------------------------------------------------------------
        _wire_turns(backend, toolbox, lists, measuring, p, send, stop_button, settings, version_go)

        # -- the conversation list --------------------------------------------------------------------------
        chat_outputs = [chatbot, p.shown, p.stats]
        showing = [p.tree, p.store_ops, p.title_box, p.undo_delete, p.share_link, p.conversation_list, *chat_outputs]
        switched = p.conversation_list.input(lists.switch, [p.conversation_list, p.stored_in, p.tree, p.busy, p.lang,
                                                            p.readonly], showing, js=READ_CHOSEN_JS, **quiet)
        def close_on_phones(wide):   # on a phone the list is a sheet over the chat: it goes once a choice is made
            return gr.skip() if wide else gr.Sidebar(open=False)

        measuring(lists.writing(switched)).then(close_on_phones, [p.wide], [sidebar], **quiet)
        for trigger in (new_chat.click, chatbot.clear):
            measuring(lists.writing(trigger(lists.new, [p.busy, p.lang, p.readonly], showing, **quiet))).then(
                close_on_phones, [p.wide], [sidebar], **quiet)
        list_refresh.click(lists.refresh, [p.stored_in, p.tree, p.lang, p.search], [p.rows, p.conversation_list],
                           js=CURRENT_JS, **quiet)
        p.search.change(lists.search, [p.search, p.rows, p.tree, p.lang], [p.conversation_list],
                       trigger_mode="always_last", **quiet)
        for trigger in (p.title_box.submit, p.title_box.blur):
            lists.saving(trigger(lists.rename, [p.title_box, p.tree, p.busy, p.readonly], [p.title_box], **quiet))
        deleted = delete.click(lists.delete, [p.tree, p.busy, p.lang, p.readonly],
                               [*showing, p.deleted, p.list_note], **quiet)
        measuring(lists.writing(deleted.then(lists.after_delete, [p.rows, p.deleted, p.search, p.lang],
                                             [p.rows, p.conversation_list], **quiet)))
        measuring(lists.saving(lists.writing(p.undo_delete.click(
            lists.undo_delete, [p.deleted, p.busy, p.lang, p.readonly], [*showing, p.deleted], js=FORGIVE_JS,
            **quiet))))
        export_all.click(lists.export, [p.stored_in], [holder], js=ALL_JS, **quiet).then(
            None, [holder], None, js=_download_js("conversations.json", "application/json"), **quiet)
        lists.writing(import_all.click(lists.import_file, [p.stored_in, p.tree, p.lang, p.search],
                                       [p.store_ops, p.rows, p.list_note, p.conversation_list], js=PICK_JS, **quiet))

        # -- share links --------------------------------------------------------------------------------------
        share.click(sharing.make_link, [p.tree, p.lang], [share_token, p.share_link, p.stats], **quiet).then(
            None, [share_token], [p.share_link], js=LINK_JS, **quiet)
        replay.click(sharing.replay, [p.tree, p.shared_about, p.lang], [replay_result], show_progress="hidden",
                     api_visibility="undocumented")

        def continue_it(tree, lang):
            tree = sharing.continued(tree)
            if tree is None:
                return {}
            return {**lists.showing(tree, lang), p.readonly: False, p.shared_about: {},
                    p.share_banner: gr.HTML(visible=False), share_actions: gr.Row(visible=False),
                    replay_result: gr.HTML(visible=False), composer_area: gr.Column(visible=True),
                    p.store_ops: {**ops(tab=tree.id), "leave_share": True}}

        measuring(lists.saving(lists.writing(continue_shared.click(
            continue_it, [p.tree, p.lang], [*showing, p.readonly, p.shared_about, p.share_banner, share_actions,
                                            replay_result, composer_area], **quiet))))

        # -- settings and language: kept in the browser, restored on load ----------------------------------
        def settings_dict(current_lang, *values):
            return {"lang": current_lang, **dict(zip(setting_names, values))}

        for component in settings:   # every change, also the ones restore and the language switch make
            component.change(settings_dict, [p.lang, *settings], [saved_settings], queue=False,
                             show_progress="hidden", trigger_mode="always_last", api_visibility="undocumented")
        textbox.change(meter, meter_inputs, [meter_line, prompt_text], js=DEBOUNCE_JS, trigger_mode="always_last",
                      **quiet)
        for component in (system_prompt, sliders["max_new_tokens"], mode):
            component.change(meter, meter_inputs, [meter_line, prompt_text], trigger_mode="always_last", **quiet)

        def relabelled(current_lang, mode_value, system_value) -> dict:
            updates = labels.updates(current_lang)
            updates[chatbot]["examples"] = examples(mode_value, current_lang)
            other = "en" if current_lang == "zh-CN" else "zh-CN"
            if system_value == default_system(other):   # the default prompt follows the language
                updates[system_prompt]["value"] = default_system(current_lang)
            return {component: gr.update(**props) for component, props in updates.items()}

        def switch_language(current_lang, tree, rows, query, readonly, about, *values):
            new = "en" if current_lang == "zh-CN" else "zh-CN"
            updates = relabelled(new, values[-1], values[0])
            stored = settings_dict(new, *values)
            if system_prompt in updates and "value" in updates[system_prompt]:
                stored["system_prompt"] = updates[system_prompt]["value"]
            chat, shown = turns.chat_update(tree, new, False)   # markers and version links in the new language
            updates[chatbot] = gr.update(**{**updates[chatbot], "value": chat["value"],
                                            "elem_classes": [READONLY_CLASS] if readonly else []})
            listed = list_update(rows or [], query, new, tree.id if tree is not None else None)
            updates[p.conversation_list] = gr.update(**{**updates.get(p.conversation_list, {}), **listed})
            extra = {p.shown: shown}
            if readonly:
                extra[p.share_banner] = gr.HTML(shared_banner_html(about, new))
            return {p.lang: new, saved_settings: stored, **updates, **extra}

        relabel_outputs = labels.components
        measuring(switch.click(switch_language, [p.lang, p.tree, p.rows, p.search, p.readonly, p.shared_about,
                                                 *settings],
                               _unique([p.lang, saved_settings, *relabel_outputs, p.shown, p.conversation_list,
                                        p.share_banner]), **quiet)).then(
            p.documents.relabel, [p.lang], [p.attached], **quiet)   # the pending chips in the new language
        mode.change(lambda value, current_lang: gr.Chatbot(examples=examples(value, current_lang)), [mode, p.lang],
                    [chatbot], **quiet)
        open_drawer.click(lambda: gr.Sidebar(open=True), None, [drawer], **quiet)
        view_prompt.click(lambda: (gr.Sidebar(open=True), gr.Accordion(open=True)), None,
                          [drawer, prompt_accordion], **quiet)

        def restore(snapshot, stored_settings, request: gr.Request):
            snapshot = snapshot if isinstance(snapshot, dict) else {}
            legacy = snapshot.get("legacy") if isinstance(snapshot.get("legacy"), dict) else {}
            if not isinstance(stored_settings, dict):   # kept by a version before the list, if at all
                stored_settings = open_browser_state(legacy.get("settings"), secret)
                stored_settings = stored_settings if isinstance(stored_settings, dict) else {}
            chosen = stored_settings.get("lang")
            if chosen not in LANGUAGES:
                chosen = language_of(request.headers.get("accept-language") if request else None)
            values = {name: stored_settings[name] for name in setting_names if name in stored_settings}
            updates = relabelled(chosen, values.get("mode", CHAT) if values.get("mode") in modes else CHAT,
                                 values.get("system_prompt", default_system("en")))
            for component, name in zip(settings, setting_names):
                if name in values and _fits(component, values[name], modes):
                    updates[component] = gr.update(**{**updates.get(component, {}), "value": values[name]})
            found = _restored(store, sharing, snapshot, open_browser_state(legacy.get("conversation"), secret),
                              chosen)
            tree = found["tree"]
            chat, shown = turns.chat_update(tree, chosen, False)
            updates[chatbot] = gr.update(**{**updates.get(chatbot, {}), "value": chat["value"],
                                            "elem_classes": [READONLY_CLASS] if found["about"] else []})
            rows = found["rows"]
            wide = bool(snapshot.get("wide"))
            ops_now = found["ops"]
            if legacy.get("conversation") and found["migrated"] or legacy.get("settings") and stored_settings:
                ops_now = {**(ops_now or ops()), "drop_legacy": True}   # read: the old entries go
            out = {p.lang: chosen, p.tree: tree, p.shown: shown, p.rows: rows, p.store_ops: ops_now, p.wide: wide,
                   p.list_note: found["note"] or count_line(store, rows, chosen), p.stats: found["error"], **updates}
            for component, update in ((p.conversation_list, list_update(rows, "", chosen, tree.id)),
                                      (p.title_box, gr.update(value=tree.title)), (sidebar, gr.update(open=wide))):
                out[component] = gr.update(**{**updates.get(component, {}), **update})   # with its new labels
            if found["about"]:
                out.update({p.readonly: True, p.shared_about: found["about"],
                            p.share_banner: gr.HTML(shared_banner_html(found["about"], chosen), visible=True),
                            share_actions: gr.Row(visible=True), composer_area: gr.Column(visible=False)})
            return out

        loaded = page.load(restore, [p.stored_in, saved_settings],
                           _unique([p.lang, p.tree, p.shown, p.rows, p.store_ops, p.wide, sidebar, p.conversation_list,
                                    p.list_note,
                                    p.title_box, p.stats, p.readonly, p.shared_about, p.share_banner,
                                    share_actions, composer_area, chatbot, *relabel_outputs, *settings]),
                           js=SNAPSHOT_JS, **quiet)
        measuring(lists.writing(loaded))

        # -- the /chat API endpoint (API clients only; stateless per call apart from its session's history) --
        _api_endpoint(backend, toolbox, listed_chat_api)
        if toolbox is not None:
            def end_session(request: gr.Request):  # the tab was closed or reloaded: its kernel goes
                toolbox.end_session(request.session_hash)

            page.unload(end_session)
        page.unload(p.documents.end_session)   # the tab was closed or reloaded: its documents go
        attach_go = gr.Button("attach", elem_id="attach-go", elem_classes=["hidden-helper"])
        detach_go = gr.Button("detach", elem_id="detach-go", elem_classes=["hidden-helper"])
        measuring(attach_go.click(p.documents.attach, [picked_document, p.lang], [p.attached, p.stats],
                                  js=ATTACH_JS, **QUIET))
        measuring(detach_go.click(p.documents.detach, [removed_document, p.lang], [p.attached], js=DETACH_JS,
                                  **QUIET))
    return page


def _restored(store: BrowserStore, sharing: Sharing, snapshot: dict, old_history, lang: str) -> dict:
    """What a page load shows: a share link's conversation (read-only), this tab's conversation, the old
    single stored conversation (moved into the list once), or a new one."""
    found = {"rows": rows_state(store.rows(snapshot.get("metas"))), "ops": None, "note": "", "error": "",
             "about": {}, "migrated": False}
    token = snapshot.get("share")
    if isinstance(token, str) and token:
        tree, about, error = sharing.open(token, lang)
        if tree is not None:
            return {**found, "tree": tree, "about": about}
        found["error"] = text("error", lang, error=error)
    tab = snapshot.get("tab") if isinstance(snapshot.get("tab"), str) else None
    tree = store.open_or_none(snapshot.get("data"), tab)
    if isinstance(old_history, list) and old_history:   # kept by a version before the list: it joins the list
        migrated = from_history(old_history, ending_of=ending_of)
        if not migrated.empty:
            saved = store.save(migrated, {"metas": snapshot.get("metas")}, tab=tree is None)
            found.update(rows=rows_state(saved.rows), ops=saved.ops, migrated=True,
                         note=saved_note(store, saved, rows_state(saved.rows), lang))
            tree = tree or migrated
    if tree is None:
        tree = Conversation()
        found["ops"] = found["ops"] or ops(tab=tree.id)
    return {**found, "tree": tree}


def _markdown_of(tree) -> str:
    messages, _ = view(tree, "en", plain=True)
    return to_markdown([m for m in messages if not is_nav(m)])


def _json_of(tree) -> str:
    return json.dumps(tree.to_dict() if tree is not None else {}, ensure_ascii=False, indent=2)


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


def _wire_turns(backend, toolbox, lists: ConversationList, measuring, p, send, stop_button, settings,
                version_go) -> None:
    """Send / Enter / an example / Retry / Edit all begin a turn the same way; Stop ends any of them. Every
    change of the conversation is then stored (``lists.saving``) and the meter measured again."""
    chatbot, textbox = p.chatbot, p.textbox
    controls = [p.busy, send, stop_button]
    quiet = QUIET
    stops = turns.StopSignals()

    async def respond(plan, tree, system_prompt, temperature, top_p, max_new_tokens, top_k, repetition_penalty,
                      seed, mode, current_lang, request: gr.Request):
        async with aclosing(turns.respond(plan, tree, system_prompt, temperature, top_p, max_new_tokens, top_k,
                                          repetition_penalty, seed, mode, current_lang, toolbox=toolbox,
                                          backend=backend, stops=stops, documents=p.documents,
                                          request=request)) as updates:   # a visitor who leaves ends it
            async for update in updates:
                yield update

    def finish(tree, lang, request: gr.Request):
        stops.forget(getattr(request, "session_hash", None))   # a Stop that came too late
        return (*turns.finish(tree, lang), p.documents.relabel(lang, request))   # (chips given back, if any)

    def show(plan, tree, lang, system_prompt, temperature, top_p, max_new_tokens, top_k, repetition_penalty, seed,
             mode, request: gr.Request):   # (a function of its own: Gradio finds gr.Request by its type hint)
        return turns.show(plan, tree, lang, system_prompt, temperature, top_p, max_new_tokens, top_k,
                          repetition_penalty, seed, mode, info=backend.info, documents=p.documents, request=request)

    begin = turns.Begin(turns.Refusals())
    state = [p.busy, p.readonly, p.lang]
    starts = [
        (textbox.submit, begin.send, [textbox, p.tree, *state]),
        (send.click, begin.send, [textbox, p.tree, *state]),
        (chatbot.example_select, begin.example, [p.tree, *state]),
        (chatbot.retry, begin.retry, [p.tree, p.shown, *state]),
        (chatbot.edit, begin.edit, [p.tree, p.shown, *state]),
    ]
    for trigger, begin_turn, inputs in starts:
        began = trigger(begin_turn, inputs, [p.plan], **quiet)
        began.failure(begin.refused, [p.lang], [p.stats], **quiet)   # refused: why, in the statistics line
        shown = lists.saving(began.success(show, [p.plan, p.tree, p.lang, *settings],
                                           [chatbot, p.shown, textbox, p.stats, p.plan, *controls, p.attached],
                                           **quiet))
        reply = shown.then(respond, [p.plan, p.tree, *settings, p.lang], [chatbot, p.shown, p.stats, textbox],
                           show_progress="hidden", api_visibility="undocumented")
        finished = lists.saving(reply.then(finish, [p.tree, p.lang], [chatbot, p.shown, *controls, p.attached],
                                           **quiet))
        measuring(finished).then(None, js=REFOCUS_JS, **quiet)
    stop_button.click(turns.stopper(stops), None, None, **quiet)
    def undo(tree, shown, busy, readonly, lang, undone: gr.UndoData, request: gr.Request):
        return turns.undo(tree, shown, busy, readonly, lang, undone, documents=p.documents, request=request)

    measuring(lists.saving(chatbot.undo(undo, [p.tree, p.shown, p.busy, p.readonly, p.lang],
                                        [chatbot, p.shown, textbox, p.attached], **quiet)))
    # mid-reply, what is kept says "interrupted" (a reload then shows the partial reply for what it is)
    lists.saving(chatbot.change(lambda: None, None, None, trigger_mode="always_last", **quiet))
    measuring(lists.saving(version_go.click(turns.navigate_versions, [p.stored_in, p.tree, p.busy, p.lang],
                                            [chatbot, p.shown], js=VERSION_JS, **quiet)))


def schema_json(value, *, schema: dict, **kwargs) -> gr.JSON:
    """A ``gr.JSON`` input (every value reaches the checks as it was sent) whose API schema says what the value
    should be: gr.JSON's own schema (``{"type": {}}``) is not a JSON schema, and MCP clients refuse it. The
    instance's ``api_info`` is replaced, not the class subclassed: Gradio writes a ``.pyi`` file next to the
    module of every Component subclass."""
    component = gr.JSON(value, **kwargs)
    component.api_info = lambda: dict(schema)
    return component


def _api_schemas(modes) -> dict[str, dict]:
    """The ``/chat`` endpoint's inputs as JSON schemas, from ``SamplingParams``' own declaration."""
    properties = SamplingParams.model_json_schema()["properties"]
    schemas = {"system_prompt": {"type": "string", "description": "the system prompt; empty for the model's own"}}
    for name in SAMPLING:
        schemas[name] = {key: properties[name][key] for key in ("type", "minimum", "maximum", "description")
                         if key in properties[name]}
    schemas["seed"] = {"type": "integer", "minimum": -1, "maximum": 2**63 - 1,
                       "description": "the same seed and settings repeat a reply; -1 = a random seed"}
    schemas["mode"] = {"type": "string", "enum": list(modes), "description": "Chat, or the model may call tools"}
    return schemas


def _api_endpoint(backend, toolbox, listed: bool = True) -> None:
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
        schemas = _api_schemas(toolbox.modes if toolbox is not None else (CHAT,))
        inputs = [schema_json(json.dumps(value) if not isinstance(value, str) else value, label=name,
                              schema=schemas[name]) for name, value in defaults.items()]
        reply, stats = gr.JSON(label="reply"), gr.Markdown()
        session_history = gr.State([])
        trigger = gr.Button()

    async def chat(message, system_prompt, temperature, top_p, max_new_tokens, top_k, repetition_penalty, seed,
                   mode, history, request: gr.Request):
        """One reply of the model to a message, streamed; within a Gradio client's session the conversation
        goes on from call to call.

        Args:
            message: the user's message
            system_prompt: the system prompt; empty for the model's own
            temperature: randomness, 0 to 2; 0 = always the most likely token
            top_p: sample from the smallest set of tokens whose probability reaches top_p
            max_new_tokens: the longest reply in tokens
            top_k: sample only from the k most likely tokens; 0 = no limit
            repetition_penalty: over 1 makes tokens already in the conversation less likely
            seed: the same seed and settings repeat a reply; -1 = a random seed
            mode: "Chat", or "Tools" / "Code interpreter" to let the model call tools
        """
        history = history or []
        # aclosing: a client that leaves closes this generator, and with it the generation
        async with aclosing(chat_fn(message, history, system_prompt or "", temperature, top_p, max_new_tokens,
                                    top_k, repetition_penalty, seed, CHAT if mode is None else mode,
                                    request=request)) as updates:
            async for answer, line in updates:
                # the exchange so far joins the session's conversation
                said = [{"role": "assistant", "content": answer}] if isinstance(answer, str) else list(answer)
                yield answer, [*history, {"role": "user", "content": message}, *said], line

    trigger.click(chat, [message, *inputs, session_history], [reply, session_history, stats], api_name="chat",
                  postprocess=False, show_progress="hidden", api_visibility="public" if listed else "undocumented")


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
    from chatglm_web.page.style import PAGE_CSS

    # The page's CSS goes in <head> as it is (Gradio scopes ``css`` to its container, and the footer and the
    # container itself are outside that scope); the branding's CSS is scoped as usual.
    return {"theme": theme(branding), "css": branding.css, "head": f"<style>{PAGE_CSS}</style><script>{STORE_JS}</script>"
                    f"<script>{DOCUMENTS_JS}</script>",
            "max_file_size": MAX_FILE_SIZE, "i18n": I18N, "footer_links": ["api", "gradio"], "js": FOCUS_INPUT_JS}
