"""The ChatGLM3 family (``families.family.ModelFamily``): which folders are ChatGLM3, and how they load.

A checkpoint is ChatGLM3's when its ``config.json`` names ``model_type`` chatglm (the original layout,
converted while loading) or glm (native GLM). A model served elsewhere is read as ChatGLM3 from its
tokenizer files when the config says so and a sentencepiece ``tokenizer.model`` is there.
"""

from __future__ import annotations

import json
from pathlib import Path

from chatglm_web.families.chatglm3.format import ChatGLM3Format
from chatglm_web.families.chatglm3.tokenizer import ChatGLM3Tokenizer
from chatglm_web.families.chatglm3.tool_calls import TOOL_CALLS

MODEL_TYPES = ("chatglm", "glm")


def _model_type(folder: Path) -> str | None:
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config.get("model_type") if isinstance(config, dict) else None


class ChatGLM3Family:
    name = "chatglm3"
    tools = TOOL_CALLS

    def detects(self, folder: Path) -> bool:
        from chatglm_web.families.chatglm3.loader import is_chatglm_checkpoint

        return is_chatglm_checkpoint(folder)

    def load(self, folder: Path, **from_pretrained_kwargs) -> tuple[object, ChatGLM3Format]:
        """Transformers' native ``GlmForCausalLM`` with ChatGLM3's generation defaults, and its format."""
        from chatglm_web.families.chatglm3.loader import (
            load_glm_model,
            set_generation_defaults,
        )

        tokenizer = ChatGLM3Tokenizer.from_pretrained(folder)
        model = load_glm_model(folder, tokenizer, **from_pretrained_kwargs)
        set_generation_defaults(model, tokenizer)
        return model, ChatGLM3Format(tokenizer)

    def tokenizer_format(self, folder: Path) -> ChatGLM3Format | None:
        if _model_type(folder) not in MODEL_TYPES or not (Path(folder) / "tokenizer.model").is_file():
            return None
        return ChatGLM3Format(ChatGLM3Tokenizer.from_pretrained(folder))


FAMILY = ChatGLM3Family()
