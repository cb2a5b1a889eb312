"""Shared fixtures: tiny ChatGLM3 checkpoints generated in the exact original on-disk format."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach a model hub

from synthetic_checkpoints import TinyChatGLM3, train_tokenizer_model, write_checkpoint  # noqa: E402

NO_STOP = {2: -30.0, "<|user|>": -30.0, "<|observation|>": -30.0}


@pytest.fixture(scope="session")
def tokenizer_model() -> bytes:
    return train_tokenizer_model()


@pytest.fixture(scope="session")
def chatglm3_checkpoint(tmp_path_factory, tokenizer_model):
    """chatglm3-6b layout: .bin shards + index, original names, tokenizer.model, remote-code files."""
    return write_checkpoint(tmp_path_factory.mktemp("chatglm3-6b-tiny"), tokenizer_model=tokenizer_model)


@pytest.fixture(scope="session")
def long_reply_checkpoint(tmp_path_factory, tokenizer_model):
    """Same format; the stop tokens are made very unlikely so replies run to max_new_tokens."""
    return write_checkpoint(tmp_path_factory.mktemp("chatglm3-tiny-long"), TinyChatGLM3(seq_length=8192),
                            tokenizer_model=tokenizer_model, token_bias=NO_STOP, seed=1)
