"""The Gradio page. It knows nothing about models: it talks to a ``ChatBackend``.

Built on ``gr.ChatInterface`` (streaming, Stop, Regenerate, Undo, Clear, edit, copy, the
``/chat`` API endpoint) with the sampling controls as additional inputs and a statistics line
as an additional output. The current conversation is kept in the browser (``gr.BrowserState``)
and restored on reload; it can be downloaded as Markdown or JSON.
"""

from __future__ import annotations

import logging
from contextlib import aclosing

import gradio as gr

from .branding import Branding
from .generation import BackendBusy, ChatBackend, Finished, InvalidRequest, Queued, SamplingParams, TextDelta
from .transcript import to_json, to_markdown, write_download

log = logging.getLogger(__name__)

LATEX = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "$", "right": "$", "display": False},
    {"left": "\\(", "right": "\\)", "display": False},
    {"left": "\\[", "right": "\\]", "display": True},
]


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
    if done.dropped_messages:
        text += (f"\n\nℹ️ The conversation is longer than the model's context: the {done.dropped_messages} oldest "
                 "messages were left out of the prompt (the system prompt is kept).")
    return text


def make_chat_fn(backend: ChatBackend):
    async def chat(message, history, system_prompt, temperature, top_p, max_new_tokens, top_k,
                   repetition_penalty, seed):
        messages = []
        if system_prompt and system_prompt.strip():
            messages.append({"role": "system", "content": system_prompt})
        messages += [m for m in history if m.get("role") in ("user", "assistant")]
        messages.append({"role": "user", "content": message})
        try:
            params = SamplingParams(
                temperature=float(temperature), top_p=float(top_p), max_new_tokens=int(max_new_tokens),
                top_k=int(top_k or 0), repetition_penalty=float(repetition_penalty),
                seed=None if seed is None or int(seed) < 0 else int(seed),
            )
            reply = ""
            # aclosing: however this generator ends (Stop, disconnect, error), the generation is cancelled
            async with aclosing(backend.stream_chat(messages, params)) as stream:
                async for event in stream:
                    if isinstance(event, Queued):
                        yield f"⏳ Waiting for a free slot… (position {event.position} in the queue)", ""
                    elif isinstance(event, TextDelta):
                        reply += event.text
                        yield reply, ""
                    elif isinstance(event, Finished):
                        if event.reason == "error":
                            raise gr.Error(f"Generation failed: {event.error}")
                        yield reply, stats_markdown(event)
        except (InvalidRequest, BackendBusy, ValueError, TypeError) as error:
            raise gr.Error(str(error)) from None

    return chat


def build_page(backend: ChatBackend, branding: Branding, *, max_new_tokens: int = 2048) -> gr.Blocks:
    with gr.Blocks(title=branding.title, analytics_enabled=False, fill_height=True,
                   delete_cache=(3600, 3600)) as page:
        gr.HTML(branding.header_html(), elem_id="brand-header")
        gr.Markdown(header_markdown(backend), elem_id="model-info")
        stats = gr.Markdown("", elem_id="reply-stats", render=False)
        # A small offline demo model answers better with its own default system prompt.
        default_system = "" if backend.info.offline_demo else branding.system_prompt
        system_prompt = gr.Textbox(default_system, label="System prompt", lines=2, render=False,
                                   elem_id="system-prompt")
        sliders = [
            gr.Slider(0.0, 2.0, value=0.8, step=0.05, label="Temperature", render=False, elem_id="temperature"),
            gr.Slider(0.05, 1.0, value=0.8, step=0.05, label="Top-p", render=False, elem_id="top-p"),
            gr.Slider(1, max_new_tokens, value=min(1024, max_new_tokens), step=1, label="Max new tokens",
                      render=False, elem_id="max-new-tokens"),
        ]
        advanced = [
            gr.Slider(0, 200, value=0, step=1, label="Top-k (0 = off)", render=False, elem_id="top-k"),
            gr.Slider(1.0, 2.0, value=1.0, step=0.01, label="Repetition penalty", render=False,
                      elem_id="repetition-penalty"),
            gr.Number(-1, label="Seed (-1 = random)", precision=0, render=False, elem_id="seed"),
        ]
        chatbot = gr.Chatbot(
            label=branding.title, elem_id="chatbot", height="55vh", latex_delimiters=LATEX,
            buttons=["copy", "copy_all"], sanitize_html=True, render_markdown=True,
            placeholder=branding.placeholder, editable="user", feedback_options=None,
        )
        chat = gr.ChatInterface(
            make_chat_fn(backend),
            chatbot=chatbot,
            textbox=gr.Textbox(placeholder=branding.input_placeholder, elem_id="chat-input", show_label=False,
                               submit_btn=True, stop_btn=True),
            additional_inputs=[system_prompt, *sliders, *advanced],
            additional_outputs=[stats],
            additional_inputs_accordion=gr.Accordion("Settings", open=False, render=False),
            examples=[[e] for e in branding.examples] or None,
            run_examples_on_click=True,
            cache_examples=False,
            editable=True,
            api_name="chat",
            fill_height=True,
            autofocus=True,
        )
        stats.render()
        with gr.Row():
            markdown_file = gr.DownloadButton("Download Markdown", size="sm", elem_id="download-md")
            json_file = gr.DownloadButton("Download JSON", size="sm", elem_id="download-json")

        saved = gr.BrowserState([], storage_key="chatglm-web-conversation")

        def remember(history):
            return history, write_download(to_markdown(history), "md"), write_download(to_json(history), "json")

        # ChatInterface updates its history State without the queue, which fires no State.change;
        # the Chatbot's own change event does (always_last: once a burst of streamed chunks settles).
        chatbot.change(remember, [chatbot], [saved, markdown_file, json_file], queue=False,
                       trigger_mode="always_last", show_progress="hidden", api_visibility="undocumented")
        chatbot.clear(lambda: [], None, [saved], queue=False, api_visibility="undocumented")

        def restore(history):
            history = history if isinstance(history, list) else []
            return history, history

        page.load(restore, [saved], [chatbot, chat.chatbot_state], queue=False, api_visibility="undocumented")
    return page


def launch_kwargs(branding: Branding) -> dict:
    return {"theme": branding.theme(), "css": branding.css}

