"""The chat-template family (``families.family.ModelFamily``): any checkpoint with a chat template, through
transformers' ``AutoModelForCausalLM`` and ``AutoTokenizer``. Asked last: it takes every folder."""

from __future__ import annotations

from pathlib import Path

from chatglm_web.families.template.format import TemplateFormat, config_eos_ids, model_eos_ids


class TemplateFamily:
    name = "template"
    tools = None

    def detects(self, folder: Path) -> bool:
        return True

    def load(self, folder: Path, **from_pretrained_kwargs) -> tuple[object, TemplateFormat]:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, **from_pretrained_kwargs)
        return model, TemplateFormat(tokenizer, model_eos_ids(model))

    def tokenizer_format(self, folder: Path) -> TemplateFormat | None:
        """None when the tokenizer here has no chat template (the server's own template formats the prompts)."""
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        if not getattr(tokenizer, "chat_template", None):
            return None
        return TemplateFormat(tokenizer, config_eos_ids(folder))


FAMILY = TemplateFamily()
