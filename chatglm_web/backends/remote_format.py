"""The chat format of a model served elsewhere: tokenizer and config files only, never weights.

    remote = load_remote_format("THUDM/chatglm3-6b")   # or a local folder
    remote.chat_format      # a family's ChatFormat, or None (no chat template here)
    remote.context_length   # from config.json; the server's own max_model_len wins when it says
    remote.name

The first family that reads the tokenizer files gives the format (``families.registry.tokenizer_format``):
ChatGLM3's injection-safe tokenizer for its checkpoints, any other model its Hugging Face tokenizer and
chat template.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from chatglm_web.families.loading import ModelLoadError
from chatglm_web.families.template.format import read_json
from chatglm_web.settings import DEFAULT_CONTEXT_LENGTH

log = logging.getLogger(__name__)

# What a tokenizer and a config can need from a Hub repository; no weights, no remote code.
TOKENIZER_FILES = ["config.json", "generation_config.json", "tokenizer.model", "tokenizer_config.json",
                   "tokenizer.json", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
                   "merges.txt", "chat_template.jinja", "chat_template.json", "*.tiktoken"]
_CONTEXT_KEYS = ("seq_length", "max_position_embeddings", "max_sequence_length", "n_positions")
DEFAULT_CONTEXT = DEFAULT_CONTEXT_LENGTH  # what a config that names no context length gets


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


def _context_length(config: dict) -> int:
    for key in _CONTEXT_KEYS:
        if isinstance(config.get(key), int) and config[key] > 0:
            return config[key]
    return DEFAULT_CONTEXT


def load_remote_format(model_id: str) -> RemoteFormat:
    """Chat format, context length (config fallback) and name of ``model_id`` without loading weights."""
    from chatglm_web.families.registry import tokenizer_format

    folder = tokenizer_folder(model_id)
    if not (folder / "config.json").is_file() and not (folder / "tokenizer_config.json").is_file():
        raise ModelLoadError(f"{model_id} has neither config.json nor tokenizer_config.json: not a model or tokenizer")
    config = read_json(folder / "config.json")
    context = _context_length(config)
    try:
        chat_format = tokenizer_format(folder)
    except Exception as error:  # sentencepiece and transformers raise many kinds
        raise ModelLoadError(f"cannot load the tokenizer of {model_id}: {error}") from error
    if chat_format is None:
        log.warning("%s has no chat template here; the server's own template formats the prompts", model_id)
    return RemoteFormat(chat_format, context, model_id)
