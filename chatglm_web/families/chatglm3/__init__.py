"""ChatGLM3 on current transformers, natively: no ``trust_remote_code``, no code from the checkpoint.

The family's one entry point is ``FAMILY`` (``family.ChatGLM3Family``, a ``families.family.ModelFamily``):
``families.registry`` asks it whether a folder is ChatGLM3 (``detects``), loads with it (``load``,
``tokenizer_format``), and the rest of the app reaches ChatGLM3 only through the ``ChatFormat`` it returns
(``format.ChatGLM3Format``) and that format's ``tools`` (``tool_calls.TOOL_CALLS``). Its parts:

``config.py``        ``config.json`` read as data and mapped to ``GlmConfig``; unsupported options (P-tuning
                     prefix, original int4 kernels, non-RMSNorm, ...) raise ``UnsupportedChatGLMConfig``
``weights.py``       the original tensors renamed and split while they stream in (``chatglm3_weight_mapping``)
``loader.py``        ``GlmForCausalLM`` from a chatglm or glm folder or Hub id; bitsandbytes 4/8-bit, fp16, bf16,
                     fp32; ChatGLM3's generation defaults (stop on ``</s>``, ``<|user|>``, ``<|observation|>``)
``tokenizer.py``     ``ChatGLM3Tokenizer`` (sentencepiece only): prompt ids equal to the official
                     ``build_chat_input``; user text never becomes a special token
``format.py``        ``ChatGLM3Format``: prompt ids, token counts, the reply stream (metadata lines hidden)
``reply.py``         a reply's metadata line and tool call, parsed with ``ast`` (never ``eval``)
``tool_prompts.py``  the tools and code interpreter system prompts ChatGLM3 was trained with
``tool_calls.py``    ``TOOL_CALLS``: tools on the system message, calls written and read, observations, steps
``steps.py``         the payload (``"chatglm3:"`` + JSON) the page keeps a tool step's exact messages in

May import: ``generation``, ``messages``, the shared modules of ``families`` (``family``, ``chat_format``,
``streaming_text``) and itself. Nothing above it: not ``families.loading`` or ``families.registry``, not
``settings``, ``engine``, ``backends``, ``tools``, ``api`` or ``page``. Test checkpoints in the original
on-disk format are written by ``tests/synthetic_checkpoints.py``.
"""

from __future__ import annotations

from chatglm_web.families.chatglm3.family import FAMILY

__all__ = ["FAMILY"]
