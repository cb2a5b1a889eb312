"""Share links on the page: the Share button, the read-only view a link opens, Replay and Continue.

A link (``conversations/share.py``) opens the conversation read-only in any browser, with no storage
needed: the message box is hidden, Retry/Edit/Undo are refused, and a banner says what answered and
with which settings. "Replay" generates the last reply again with the link's settings and seed, and shows
where the new reply differs from the shared one. "Continue this conversation" makes it the visitor's own
(a new conversation in their list), and the link leaves the address bar.
"""

from __future__ import annotations

import html
import logging
from contextlib import aclosing

import gradio as gr

from chatglm_web.conversations.share import ShareLinks, TooLong, replay_diff, replay_inputs
from chatglm_web.conversations.tree import Conversation, InvalidConversation, new_id
from chatglm_web.generation import BackendBusy, Finished, InvalidRequest
from chatglm_web.page.chat import start_turn
from chatglm_web.page.strings import text, translate_error

log = logging.getLogger(__name__)

LINK_JS = "(token) => [token ? location.origin + location.pathname + '#share=' + token : '']"


def banner_html(about: dict, lang: str) -> str:
    generation = about.get("generation") or {}
    words = text("shared_banner", lang, model=model_title_of(about.get("model", "")),
                 precision=about.get("precision", "?"), temperature=generation.get("temperature", "?"),
                 top_p=generation.get("top_p", "?"), seed=generation.get("seed", "?"))
    return f'<p class="share-banner" role="status">{html.escape(words)}</p>'


def model_title_of(name: str) -> str:
    return name.split(" (")[0].rstrip("/").split("/")[-1] or name


class Sharing:
    def __init__(self, links: ShareLinks, backend, toolbox=None):
        self.links, self.backend, self.toolbox = links, backend, toolbox

    def make_link(self, tree: Conversation | None, lang: str):
        """Outputs (token, the link box, stats): the front end turns the token into the page's link."""
        if tree is None or tree.empty:
            return "", gr.Textbox(visible=False), text("error", lang, error=text("share_empty", lang))
        info = self.backend.info
        try:
            token = self.links.token(tree, model=info.name, precision=info.precision)
        except TooLong as error:
            return "", gr.Textbox(visible=False), text("error", lang, error=text(
                "share_too_long", lang, chars=error.chars, limit=error.limit))
        return token, gr.Textbox(visible=True), ""

    def open(self, token, lang: str) -> tuple[Conversation | None, dict, str]:
        """(the shared conversation, what it was made with, an error to show) for a link's token."""
        try:
            conversation, about = self.links.open(token)
        except ValueError as error:
            return None, {}, text("share_unreadable", lang, error=str(error))
        return conversation, about, ""

    async def replay(self, tree: Conversation | None, about: dict, lang: str, request: gr.Request):
        """The last reply generated again with the link's settings and seed; then where it differs."""
        if tree is None or not about:
            yield gr.skip()
            return
        try:
            history, message, shared = replay_inputs(tree)
        except InvalidConversation as error:
            yield _panel(html.escape(str(error)))
            return
        generation = about.get("generation") or {}
        seed = generation.get("seed")
        info = self.backend.info
        note = ""
        if about.get("model") != info.name or about.get("precision") != info.precision:
            note = text("replay_other_model", lang, model=model_title_of(info.name), precision=info.precision,
                        shared=model_title_of(about.get("model", "")), shared_precision=about.get("precision", "?"))
        sampling = {name: generation[name] for name in ("temperature", "top_p", "max_new_tokens", "top_k",
                                                        "repetition_penalty") if name in generation}
        yield _panel(html.escape(text("replaying", lang, seed=seed)))
        reply = ""
        try:
            turn = await start_turn(self.backend, self.toolbox, message, history,
                                    generation.get("system_prompt", ""), generation.get("mode", "Chat"), request,
                                    lang, seed=seed, **sampling)
            async with aclosing(turn) as updates:
                async for update in updates:
                    if isinstance(update, Finished):
                        if update.reason == "error":
                            raise InvalidRequest(text("generation_failed", "en", error=update.error))
                        continue
                    answer, _ = update
                    reply = answer if isinstance(answer, str) else _text(answer)
                    yield _panel(html.escape(text("replaying", lang, seed=seed)) + f"<div>{html.escape(reply)}</div>")
        except (InvalidRequest, BackendBusy) as error:
            yield _panel(html.escape(text("error", lang, error=translate_error(str(error), lang))))
            return
        same, marked = replay_diff(_text(shared.messages), reply)
        head = text("replay_same" if same else "replay_differs", lang, seed=seed) + note
        yield _panel(f"<p>{html.escape(head)}</p><div class=\"replay-text\">{marked}</div>")

    @staticmethod
    def continued(tree: Conversation | None) -> Conversation | None:
        """The shared conversation as the visitor's own: a new id, so it never overwrites theirs."""
        if tree is None:
            return None
        tree.id = new_id("c")
        return tree


def _text(messages) -> str:
    from chatglm_web.messages import plain_text

    return "\n\n".join(plain_text(m.get("content")) for m in messages or [] if isinstance(m, dict)
                       and isinstance(m.get("content"), (str, list)))


def _panel(inner: str):
    return gr.HTML(f'<div class="replay-panel">{inner}</div>', visible=True)
