"""What the model sees: the token meter under the message box, and the exact prompt in the drawer.

As the visitor types (debounced in the browser, then only the newest request runs), the backend measures
the prompt the message would make, with the real tokenizer and the same fitting code the request takes,
off the event loop (``ChatBackend.preview``). The meter shows the total out of the context, split into
system prompt, history and the new message, and how many of the oldest messages will be left out.
"""

from __future__ import annotations

import asyncio
import html
import logging

import gradio as gr

from chatglm_web.generation import InvalidRequest, SamplingParams
from chatglm_web.tools.toolbox import CHAT, INTERPRETER, TOOLS
from chatglm_web.page.chat import conversation, seed_value
from chatglm_web.page.strings import text, translate_error

log = logging.getLogger(__name__)

#: The browser waits this long after a keystroke before it asks (Gradio then runs only the newest request).
DEBOUNCE_MS = 300
DEBOUNCE_JS = f"""async (...args) => {{
  await new Promise((resolve) => setTimeout(resolve, {DEBOUNCE_MS}));
  const box = document.querySelector('#chat-input textarea');
  if (box) args[0] = box.value;
  return args;
}}"""
#: What the meter measures while the box is empty (its tokens are left out of the split shown).
_PLACEHOLDER = "…"


def mode_system_message(toolbox, mode) -> dict | None:
    """The system message a tool mode puts first (without starting a kernel); None in Chat mode."""
    if toolbox is None or mode in (None, "", CHAT):
        return None
    from chatglm_web.tools.agent import InterpreterRunner, ToolRunner

    if mode == TOOLS:
        return ToolRunner(toolbox.registry).system_message()
    if mode == INTERPRETER:
        return InterpreterRunner.system_message()
    return None


def measure(backend, toolbox, message, history, system_prompt, mode, sampling: dict):
    """``ChatBackend.preview`` of the request this message would make (CPU-bound: run it in a thread)."""
    typed = isinstance(message, str) and message.strip() != ""
    messages = conversation(system_prompt, history, message if typed else _PLACEHOLDER,
                            mode_system_message(toolbox, mode))
    sampling = {**sampling, "seed": seed_value(sampling.get("seed"))}
    params = SamplingParams.from_form(**sampling)
    return backend.preview(messages, params), typed


def meter_line(preview, typed: bool, lang: str) -> str:
    if typed:
        line = text("meter", lang, total=preview.total, context=preview.context_length, system=preview.system,
                    history=preview.history, new=preview.new)
    else:
        line = text("meter", lang, total=preview.total - preview.new, context=preview.context_length,
                    system=preview.system, history=preview.history, new=0)
    if preview.dropped_messages:
        line += text("meter_dropped", lang, count=preview.dropped_messages)
    if not preview.exact:
        line += text("meter_estimate", lang)
    return f'<p class="token-meter">{html.escape(line)}</p>'


def make_meter(backend, toolbox, documents=None):
    """``documents`` (``attachments.PageDocuments``): the meter counts the documents the next turn takes."""

    async def meter(message, tree, system_prompt, temperature, top_p, max_new_tokens, top_k, repetition_penalty,
                    seed, mode, lang, request: gr.Request = None):
        """(the meter line, the exact prompt) for the message being typed after the shown conversation."""
        history = tree.messages() if tree is not None else []
        sampling = dict(temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, top_k=top_k,
                        repetition_penalty=repetition_penalty, seed=seed)
        try:
            if documents is not None:   # the branch's and the pending documents, in their messages
                typed = isinstance(message, str) and message.strip() != ""
                pending = documents.store.pending(getattr(request, "session_hash", None))
                # an empty box is measured as the placeholder (as ``measure`` does), unless documents wait to go
                asked = message if typed or pending else _PLACEHOLDER
                framed = await asyncio.to_thread(documents.preview, tree, asked if isinstance(asked, str) else "",
                                                 system_prompt, mode, sampling, lang, request)
                if framed is not None:
                    history, composed = framed
                    message = composed if typed or pending else message
            preview, typed = await asyncio.to_thread(measure, backend, toolbox, message, history, system_prompt,
                                                     mode, sampling)
        except InvalidRequest as error:
            line = text("error", lang, error=translate_error(str(error), lang))
            return f'<p class="token-meter">{html.escape(line)}</p>', ""
        except Exception:
            log.exception("measuring the prompt failed")
            return "", ""
        return meter_line(preview, typed, lang), preview.text

    return meter
