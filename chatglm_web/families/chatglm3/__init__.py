"""ChatGLM3 on current transformers, natively: no ``trust_remote_code``, no code from the checkpoint.

Public API:

    from chatglm_web.families import chatglm3
    model, tokenizer, info = chatglm3.load("THUDM/chatglm3-6b", precision="4bit")  # or a local folder
    ids = chatglm3.build_prompt(tokenizer, [{"role": "system", "content": "..."},
                                            {"role": "user", "content": "你好"}])
    reply = chatglm3.parse_reply(text, tools_available=False)   # metadata line, tool calls (no eval)

* ``load`` reads ``config.json`` as data (``config.to_glm_config``), builds transformers'
  ``GlmForCausalLM`` and renames/splits the original tensors while they stream in
  (``weights.chatglm3_weight_mapping``); bitsandbytes 4/8-bit, fp16, bf16 and fp32 all apply.
  Native GLM folders (``model_type: glm``) load as they are. Unsupported options (P-tuning
  prefix, original int4 kernels, non-RMSNorm, ...) raise ``UnsupportedChatGLMConfig`` naming the key.
* ``ChatGLM3Tokenizer`` (sentencepiece only) builds prompt ids equal to the official
  ``build_chat_input``; user text never becomes a special token.
* Generation stops on ``</s>``, ``<|user|>`` and ``<|observation|>`` (``tokenizer.stop_token_ids``).
* ``synthetic.write_checkpoint`` writes random checkpoints in the exact original on-disk format.
"""

from __future__ import annotations

from chatglm_web.families.chatglm3.config import UnsupportedChatGLMConfig, to_glm_config
from chatglm_web.families.chatglm3.reply import ParsedReply, ToolCall, parse_reply
from chatglm_web.families.chatglm3.tokenizer import SPECIAL_TOKENS, ChatGLM3Tokenizer


def build_prompt(tokenizer: ChatGLM3Tokenizer, messages: list[dict]) -> list[int]:
    """Prompt ids for a conversation, ending with ``<|assistant|>``."""
    return tokenizer.build_chat_input(messages)


def load(model_id: str, precision: str = "auto", device: str = "auto"):
    """(model, tokenizer, info) for a ChatGLM3/GLM checkpoint folder or Hub id."""
    from chatglm_web.families.loading import ModelLoadError, load_from_folder
    from chatglm_web.settings import Settings
    from chatglm_web.families.chatglm3.loader import is_chatglm_checkpoint, resolve_checkpoint

    folder = resolve_checkpoint(model_id)
    if not is_chatglm_checkpoint(folder):
        raise ModelLoadError(f"{model_id} is not a ChatGLM3/GLM checkpoint")
    loaded = load_from_folder(folder, Settings(model=model_id, precision=precision, device=device), model_id)
    return loaded.model, loaded.chat_format.tokenizer, loaded.info


__all__ = ["load", "build_prompt", "parse_reply", "ParsedReply", "ToolCall", "ChatGLM3Tokenizer",
           "SPECIAL_TOKENS", "UnsupportedChatGLMConfig", "to_glm_config"]
