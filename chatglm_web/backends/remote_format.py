"""The chat format of a model served elsewhere: tokenizer and config files only, never weights.

    remote = load_remote_format("THUDM/chatglm3-6b")   # or a local folder
    remote.chat_format      # ChatGLM3Format, TemplateFormat, or None (no chat template here)
    remote.context_length   # from config.json; the server's own max_model_len wins when it says
    remote.name

ChatGLM3 checkpoints (``model_type`` chatglm or glm, with a sentencepiece ``tokenizer.model``) get the
app's injection-safe tokenizer; any other model its Hugging Face tokenizer and chat template.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from chatglm_web.families.loading import ModelLoadError

log = logging.getLogger(__name__)

# What a tokenizer and a config can need from a Hub repository; no weights, no remote code.
TOKENIZER_FILES = ["config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
                   "tokenizer.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
                   "merges.txt", "chat_template.jinja", "chat_template.json", "*.tiktoken"]
_CONTEXT_KEYS = ("seq_length", "max_position_embeddings", "max_sequence_length", "n_positions")
DEFAULT_CONTEXT = 4096


@dataclass
class RemoteFormat:
    chat_format: object | None
    context_length: int
    name: str


def tokenizer_folder(model_id: str) -> Path:
    """A local folder as it is, or the Hub snapshot of ``model_id`` with ``TOKENIZER_FILES`` only (cache first)."""
    path = Path(model_id).expanduser()
    if path.is_dir():
        return path
    if model_id.startswith(("/", "./", "../", "~")):
        raise ModelLoadError(f"there is no folder {path}; --model must be a checkpoint folder or a Hub id")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_id, allow_patterns=TOKENIZER_FILES, local_files_only=True))
    except Exception:
        pass
    try:
        return Path(snapshot_download(model_id, allow_patterns=TOKENIZER_FILES))
    except Exception as error:
        raise ModelLoadError(f"cannot find or download the tokenizer of {model_id!r}: {error}") from error


def _read_json(file: Path) -> dict:
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def _context_length(config: dict) -> int:
    for key in _CONTEXT_KEYS:
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    return DEFAULT_CONTEXT


def _eos_ids(folder: Path, config: dict) -> list[int]:
    eos = _read_json(folder / "generation_config.json").get("eos_token_id", config.get("eos_token_id"))
    return [eos] if isinstance(eos, int) else [int(i) for i in eos or []]


def load_remote_format(model_id: str) -> RemoteFormat:
    """Chat format, context length (config fallback) and name of ``model_id`` without loading weights."""
    from chatglm_web.families.chat_format import ChatGLM3Format, TemplateFormat
    from chatglm_web.families.chatglm3.tokenizer import ChatGLM3Tokenizer

    folder = tokenizer_folder(model_id)
    if not (folder / "config.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise ModelLoadError(f"{model_id} has neither config.json nor tokenizer_config.json: not a model or tokenizer")
    config = _read_json(folder / "config.json")
    context = _context_length(config)
    try:
        if config.get("model_type") in ("chatglm", "glm") and (folder / "tokenizer.model").is_file():
            return RemoteFormat(ChatGLM3Format(ChatGLM3Tokenizer.from_pretrained(folder)), context, model_id)
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as error:  # sentencepiece and transformers raise many kinds
        raise ModelLoadError(f"cannot load the tokenizer of {model_id}: {error}") from error
    if not getattr(tokenizer, "chat_template", None):
        log.warning("%s has no chat template here; the server's own template formats the prompts", model_id)
        return RemoteFormat(None, context, model_id)
    return RemoteFormat(TemplateFormat(tokenizer, _eos_ids(folder, config)), context, model_id)
