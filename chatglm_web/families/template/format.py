"""The chat-template family's format: any Hugging Face chat model through its tokenizer's own chat template.

    TemplateFormat(tokenizer, stop_token_ids)   # ValueError for a tokenizer without a chat template
    model_eos_ids(model)                        # the stop ids a loaded model's generation config names
    config_eos_ids(folder)                      # the same from generation_config.json / config.json alone
"""

from __future__ import annotations

import json
from pathlib import Path

from chatglm_web.families.chat_format import MessageCounts, TextStream
from chatglm_web.messages import normalize_messages


def model_eos_ids(model) -> list[int]:
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = model.config.eos_token_id
    return [eos] if isinstance(eos, int) else list(eos or [])


def read_json(file: Path) -> dict:
    """A JSON object file's content; {} when it is missing, unreadable or not an object."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def config_eos_ids(folder: Path) -> list[int]:
    folder = Path(folder)
    config = read_json(folder / "config.json")
    eos = read_json(folder / "generation_config.json").get("eos_token_id", config.get("eos_token_id"))
    return [eos] if isinstance(eos, int) else [int(i) for i in eos or []]


class TemplateFormat:
    """The ``ChatFormat`` of any Hugging Face chat model: its tokenizer's own chat template. No tool calls."""

    safe_prompt_ids = False  # the template's text is tokenized whole: a remote server applies its own template
    tools = None

    def __init__(self, tokenizer, stop_token_ids: list[int]):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template, so it is not a chat model")
        self.tokenizer = tokenizer
        self.stop_token_ids = list(stop_token_ids)
        self._counts = MessageCounts()

    fixed_tokens = 0  # the template's own text is counted per message (and checked on the final prompt)
    _PER_MESSAGE = 8  # role markers and separators of a typical template

    def _render(self, messages: list[dict], *, tokenize: bool, add_generation_prompt: bool = True):
        messages = [{"role": m["role"], "content": m["content"]} for m in normalize_messages(messages)]
        out = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                 tokenize=tokenize)
        if tokenize and hasattr(out, "keys"):  # BatchEncoding
            out = out["input_ids"]
        return list(out) if tokenize else out

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        return self._render(messages, tokenize=True)

    def message_tokens(self, message: dict) -> int:
        """An estimate (the content's tokens plus the usual markers); the final prompt is measured exactly."""
        return self._counts.get(normalize_messages([message])[0], self._estimate)

    def text_tokens(self, text: str) -> int:
        """The tokenizer's ids of ``text``, without special tokens added."""
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    def _estimate(self, message: dict) -> int:
        return len(self.tokenizer.encode(message["content"], add_special_tokens=False)) + self._PER_MESSAGE

    def prompt_text(self, messages: list[dict], ids: list[int]) -> str:
        """The chat template's text for ``messages`` (what ``ids`` encode), its markers written out."""
        return self._render(messages, tokenize=False)

    def prompt_split(self, messages: list[dict], ids: list[int]) -> tuple[int, int, int]:
        """(system, history, new) tokens of ``ids``, the prompt of ``messages``, by rendering the conversation up
        to the system message and up to the last message: the template's text before a message goes with it
        (without a system message, any fixed start goes with the first message). Sums to ``len(ids)``."""
        total = len(ids)
        has_system = messages[0].get("role") == "system" and len(messages) > 1
        system = len(self._render(messages[:1], tokenize=True, add_generation_prompt=False)) if has_system else 0
        system = min(system, total)
        before_new = system
        if len(messages) > (2 if has_system else 1):  # there is history
            before_new = len(self._render(messages[:-1], tokenize=True, add_generation_prompt=False))
        before_new = min(max(before_new, system), total)
        return system, before_new - system, total - before_new

    def text_stream(self) -> TextStream:
        return TextStream(self.tokenizer)
