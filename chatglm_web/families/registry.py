"""The model families the app knows, and the questions only a family can answer.

    family_for(folder)        -> the first family in ``FAMILIES`` that detects the checkpoint
    tokenizer_format(folder)  -> the chat format of a model served elsewhere (tokenizer files only), or None
    tool_calls()              -> the tool-call dialect the Tools and Code interpreter modes, the API's ``tools``
                                 and the page's tool steps speak

``FAMILIES`` is asked in order: ChatGLM3 first (its own checkpoints), the chat-template family last (any
other checkpoint). Only a format whose ``tools`` is set is offered the tool modes (``ModelInfo.tools``), and
one family has a dialect today, so ``tool_calls()`` is that family's; were there two, the loaded format's own
``tools`` would be passed down instead.
"""

from __future__ import annotations

from pathlib import Path

from chatglm_web.families.chatglm3 import FAMILY as CHATGLM3
from chatglm_web.families.family import ChatFormat, ModelFamily, ToolCalls
from chatglm_web.families.template import FAMILY as TEMPLATE

FAMILIES: tuple[ModelFamily, ...] = (CHATGLM3, TEMPLATE)


def family_for(folder: Path) -> ModelFamily:
    for family in FAMILIES:
        if family.detects(folder):
            return family
    raise ValueError(f"no model family reads {folder}")  # not reached: the template family takes any folder


def tokenizer_format(folder: Path) -> ChatFormat | None:
    for family in FAMILIES:
        chat_format = family.tokenizer_format(folder)
        if chat_format is not None:
            return chat_format
    return None


def tool_calls() -> ToolCalls:
    return next(family.tools for family in FAMILIES if family.tools is not None)
