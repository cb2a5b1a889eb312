"""Native ChatGLM3 tokenizer, built directly on sentencepiece (no checkpoint code, no HF class).

ChatGLM3's ``tokenizer.model`` is a plain sentencepiece model; nine special tokens follow its
vocabulary with ids ``sp_size + 0..8`` (``SPECIAL_TOKENS`` order). Special tokens are only ever
*placed* by :meth:`ChatGLM3Tokenizer.build_chat_input` / :meth:`message_ids`; text is encoded with
sentencepiece alone, so nothing a user types (``<|assistant|>``, ``sop``, ``[gMASK]``...) can turn
into a special id.

Public API::

    tok = ChatGLM3Tokenizer.from_pretrained("path/to/checkpoint")   # folder or tokenizer.model
    tok.vocab_size, tok.eos_token_id (2), tok.pad_token_id (0)
    tok.special_token_ids["<|user|>"], tok.prefix_ids ([gMASK, sop]), tok.stop_token_ids
    tok.encode(text) -> list[int]                    # sentencepiece only
    tok.decode(ids, skip_special_tokens=True) -> str
    tok.message_ids(role, content, metadata="") -> list[int]
    tok.build_chat_input(messages, add_generation_prompt=True) -> list[int]

Layout (see the ChatGLM3 spec): ``[gMASK] sop`` + per message
``[<|role|>] + sp.encode(metadata + "\\n") + sp.encode(content)`` + ``[<|assistant|>]``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import sentencepiece as spm

SPECIAL_TOKENS = ("[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
                  "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
ROLES = ("system", "user", "assistant", "observation")


class ChatGLM3Tokenizer:
    """ChatGLM3 tokenizer: sentencepiece for text, special ids placed only by the chat layout."""

    eos_token_id = 2
    pad_token_id = 0

    def __init__(self, model_proto: bytes):
        self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.sp_size = self.sp.get_piece_size()
        self.vocab_size = self.sp_size + len(SPECIAL_TOKENS)
        self.special_token_ids = {token: self.sp_size + i for i, token in enumerate(SPECIAL_TOKENS)}
        self._special_by_id = {i: token for token, i in self.special_token_ids.items()}
        # sentencepiece's own <unk>/<s>/</s>: dropped too when skipping special tokens.
        self._sp_control_ids = {i for i in (self.sp.unk_id(), self.sp.bos_id(), self.sp.eos_id()) if i >= 0}

    @classmethod
    def from_pretrained(cls, folder_or_path: str | Path) -> "ChatGLM3Tokenizer":
        """Load from a checkpoint folder holding ``tokenizer.model`` or from the file itself."""
        path = Path(folder_or_path)
        if path.is_dir():
            path = path / "tokenizer.model"
        if not path.is_file():
            raise FileNotFoundError(f"ChatGLM3 tokenizer model not found: {path}")
        return cls(path.read_bytes())

    @property
    def prefix_ids(self) -> list[int]:
        return [self.special_token_ids["[gMASK]"], self.special_token_ids["sop"]]

    @property
    def stop_token_ids(self) -> list[int]:
        """Generation stops on ``</s>``, ``<|user|>`` or ``<|observation|>``."""
        return [self.eos_token_id, self.special_token_ids["<|user|>"], self.special_token_ids["<|observation|>"]]

    def encode(self, text: str) -> list[int]:
        """Sentencepiece ids of ``text`` (with its dummy-prefix "▁"); never a special id."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return self.sp.encode(text)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids``. Runs of ordinary ids go through sentencepiece decode (exact bytes and
        spaces). Special ids are dropped when skipping (with sentencepiece's <unk>/<s>/</s>), else
        rendered as their strings, which splits the sentencepiece runs as the official code does.
        Ids outside the vocabulary (unused embedding rows) are always dropped."""
        pieces: list[str] = []
        run: list[int] = []
        for i in map(int, ids):
            special = self._special_by_id.get(i)
            if special is not None:
                if skip_special_tokens:
                    continue
                if run:
                    pieces.append(self.sp.decode(run))
                    run = []
                pieces.append(special)
            elif 0 <= i < self.sp_size and not (skip_special_tokens and i in self._sp_control_ids):
                run.append(i)
        if run:
            pieces.append(self.sp.decode(run))
        return "".join(pieces)

    def message_ids(self, role: str, content: str, metadata: str = "") -> list[int]:
        """``[<|role|>] + sp.encode(metadata + "\\n") + sp.encode(content)``."""
        if role not in ROLES:
            raise ValueError(f"unknown ChatGLM3 role {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str) or not isinstance(metadata, str):
            raise ValueError(f"{role} message: content and metadata must be str")
        return [self.special_token_ids[f"<|{role}|>"]] + self.encode(metadata + "\n") + self.encode(content)

    def build_chat_input(self, messages: Sequence[Mapping], add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids for ``messages`` (dicts with ``role``, ``content``, optional ``metadata``,
        and ``tools`` on a system message, appended as indented JSON to its content)."""
        ids = list(self.prefix_ids)
        for message in messages:
            role, content = message.get("role"), message.get("content", "")
            tools = message.get("tools")
            if tools is not None:
                if role != "system":
                    raise ValueError(f"'tools' belong on the system message, not on a {role!r} message")
                content = content + "\n" + json.dumps(tools, indent=4, ensure_ascii=False)
            ids += self.message_ids(role, content, message.get("metadata") or "")
        if add_generation_prompt:
            ids.append(self.special_token_ids["<|assistant|>"])
        return ids
