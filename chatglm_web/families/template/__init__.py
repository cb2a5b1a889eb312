"""Any Hugging Face chat model, through its tokenizer's own chat template.

The family's one entry point is ``FAMILY`` (``family.TemplateFamily``, a ``families.family.ModelFamily``),
asked last by ``families.registry``: it takes any checkpoint. ``format.py`` holds its ``TemplateFormat``
(no tool calls); ``offline.py`` the small demo model that runs when no model hub is reachable.

May import what ``families`` may; its format only ``generation``, ``messages`` and the shared modules of
``families``.
"""

from __future__ import annotations

from chatglm_web.families.template.family import FAMILY

__all__ = ["FAMILY"]
