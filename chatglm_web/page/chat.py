"""One chat turn, from the page's inputs to streamed (reply, statistics line) updates. No layout here.

    conversation(system_prompt, history, message)  -> the messages the model sees
    chat_turn / agent_turn(backend, messages, params[, runner])
                                                   -> (reply or the turn's messages, statistics line) updates;
                                                      a failed generation's ``Finished`` last
    make_chat_fn(backend, toolbox)                 -> the ``/chat`` API endpoint's function

The queue position is shown in the statistics line, never as a chat message, so it can never be sent
back to the model as history. How a reply ended (stopped, cut off, failed, interrupted) is a marker
message of its own (``markers.py``), never part of the reply, and never sent to the model.
"""

from __future__ import annotations

import asyncio
import logging
import re
from contextlib import aclosing

import gradio as gr
from gradio.processing_utils import save_bytes_to_cache
from gradio.utils import get_upload_folder

from chatglm_web.tools.agent import StepFinished, run_agent
from chatglm_web.messages import normalize_messages
from chatglm_web.generation import (BackendBusy, ChatBackend, Finished, InvalidRequest, Queued, SamplingParams, TextDelta,
                          check_valid_text)
from chatglm_web.page.steps import TurnView, step_messages
from chatglm_web.tools.toolbox import CHAT
from chatglm_web.page.markers import is_marker
from chatglm_web.page.strings import text

log = logging.getLogger(__name__)
request_log = logging.getLogger("chatglm_web.requests")  # one line per request, as the backend writes them

_QUEUE_STATUS_RE = re.compile(r"⏳ Waiting for a free slot… \(position \d+ in the queue\)")  # kept by 0.x pages
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def stats_markdown(done: Finished, lang: str = "en") -> str:
    if done.reason == "error":
        return text("error", lang, error=text("generation_failed", lang, error=done.error))
    line = text("stats", lang, prompt=done.prompt_tokens, reply=done.completion_tokens, speed=done.tokens_per_second)
    clamped = getattr(done, "max_new_tokens_clamped", None)
    if clamped:
        line += text("budget", lang, tokens=clamped)
    if done.dropped_messages:
        line += "\n\n" + text("dropped", lang, count=done.dropped_messages)
    return line


def queue_status(position: int, lang: str = "en") -> str:
    """The statistics line while a request waits for a slot."""
    return text("queued", lang, position=position)


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


def printable(value) -> str:
    """``value`` with every unpaired surrogate replaced by U+FFFD, so that it can be sent to the browser."""
    if not isinstance(value, str):
        return ""
    return _LONE_SURROGATE.sub("\ufffd", value)


def check_text(message, system_prompt, history) -> None:
    """Reject unpaired surrogates with a message that says where they are (raises ``InvalidRequest``): Gradio
    would fail to send such text back, with a bare ``{"error": null}``."""
    for what, value in (("message", message), ("system prompt", system_prompt), ("conversation", history)):
        for piece in _strings(value):
            check_valid_text(piece, what)


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
            content = normalize_messages([item])[0]["content"].strip()
            if _QUEUE_STATUS_RE.fullmatch(content) or is_marker(content):
                continue  # how a reply ended is for the reader, not the model; waiting lines of 0.x pages
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


def make_chat_fn(backend: ChatBackend, toolbox=None):
    """The ``/chat`` API endpoint's function: streams (reply, statistics line), in English.

    In Chat mode the reply is its text; in Tools and Code interpreter mode (``toolbox``) it is the turn's
    messages: text, a collapsible step per call (``steps.py``), images. Every error is raised as a
    ``gr.Error`` with a message for the client.
    """

    async def chat(message, history, system_prompt, temperature, top_p, max_new_tokens, top_k,
                   repetition_penalty, seed, mode=CHAT, request: gr.Request = None):
        failed = None
        try:
            turn = await start_turn(backend, toolbox, message, history, system_prompt, mode, request,
                                    temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                    top_k=top_k, repetition_penalty=repetition_penalty, seed=seed)
            # aclosing: however this generator ends (Stop, disconnect, error), the generation is cancelled
            async with aclosing(turn) as updates:
                async for update in updates:
                    if isinstance(update, Finished):
                        if update.reason == "error":
                            failed = text("generation_failed", "en", error=update.error)
                    else:
                        yield update
        except (InvalidRequest, BackendBusy) as error:
            failed = str(error)
        except Exception:  # a bug must not leave the client without an answer either
            log.exception("chat request failed")
            failed = text("server_error", "en")
        if failed is not None:
            raise gr.Error(failed, print_exception=False)

    return chat


async def start_turn(backend: ChatBackend, toolbox, message, history, system_prompt, mode, request, lang="en",
                     **sampling):
    """The turn's update stream (``chat_turn`` or ``agent_turn``) after every check of the input; raises
    ``InvalidRequest`` (logged in one line) for bad input, before the backend sees anything."""
    try:
        check_text(message, system_prompt, history)
        sampling["seed"] = seed_value(sampling.get("seed"))
        params = SamplingParams.from_form(**sampling)
        runner = await mode_runner(toolbox, mode, request)
    except InvalidRequest as error:  # refused before the backend, which logs every request it sees
        request_log.info("request invalid: %s", error)
        raise
    if runner is None:
        return chat_turn(backend, conversation(system_prompt, history, message), params, lang)
    messages = conversation(system_prompt, history, message, runner.system_message())
    return agent_turn(backend, messages, params, runner, lang)


async def mode_runner(toolbox, mode, request):
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


async def chat_turn(backend: ChatBackend, messages: list[dict], params: SamplingParams, lang: str = "en"):
    """Chat mode: (reply text, statistics line) updates; the generation's ``Finished`` last."""
    reply = ""
    async with aclosing(backend.stream_chat(messages, params)) as stream:
        async for event in stream:
            if isinstance(event, Queued):
                yield [], queue_status(event.position, lang)  # [] adds no chat message
            elif isinstance(event, TextDelta):
                reply += event.text
                yield reply, ""
            elif isinstance(event, Finished):
                if event.reason != "error":
                    yield reply, stats_markdown(event, lang)
                yield event


async def agent_turn(backend: ChatBackend, messages: list[dict], params: SamplingParams, runner,
                     lang: str = "en"):
    """Tools / Code interpreter mode: (the turn's messages, statistics line) updates, through the tool loop;
    the last round's ``Finished`` last."""
    turn = TurnView()
    stats, last = "", None
    async with aclosing(run_agent(backend, messages, params, runner)) as events:
        async for event in events:
            if isinstance(event, Queued):
                yield turn.messages, queue_status(event.position, lang)
                continue
            if isinstance(event, Finished):
                if event.reason == "error":
                    yield event
                    return
                stats, last = stats_markdown(event, lang), event
            elif isinstance(event, StepFinished):
                turn.apply(event, images=[_image_file(png) for png in event.step.images])
            else:
                turn.apply(event)
            yield [dict(m) for m in turn.messages], stats
    if last is not None:   # how the turn's last round ended
        yield last


def _image_file(png: bytes) -> str:
    """A code interpreter image as a file in Gradio's cache (cleaned with it), for the chat to show."""
    return save_bytes_to_cache(png, "image.png", get_upload_folder())
