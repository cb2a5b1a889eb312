"""Settings, precision choice and the app's start-up paths (explicit model, offline default)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from chatglm_web.generation import SamplingParams, TextDelta
from chatglm_web.loading import GPU_HEADROOM, ModelLoadError, choose_precision, estimate_memory, resolve_device
from chatglm_web.settings import DEFAULT_MODEL, parse_settings

REPO = Path(__file__).resolve().parents[1]
SIX_B = 6_243_584_000  # ChatGLM3-6B parameters
SIX_B_EMBEDDINGS = 2 * 65024 * 4096


def test_flags_env_vars_and_defaults():
    s = parse_settings([], environ={})
    assert (s.model, s.precision, s.host, s.share, s.model_explicit) == (DEFAULT_MODEL, "auto", "127.0.0.1", False, False)
    env = {"CHATGLM_WEB_MODEL": "/m", "CHATGLM_WEB_PRECISION": "4bit", "CHATGLM_WEB_PORT": "9000",
           "CHATGLM_WEB_SHARE": "true", "CHATGLM_WEB_AUTH": "a:b", "CHATGLM_WEB_MAX_INPUT_TOKENS": "512"}
    s = parse_settings([], environ=env)
    assert (s.model, s.precision, s.port, s.share, s.auth_pair, s.max_input_tokens) == ("/m", "4bit", 9000, True, ("a", "b"), 512)
    assert s.model_explicit
    s = parse_settings(["--precision", "fp16", "--port", "1234", "--no-share", "--device", "cpu"], environ=env)
    assert (s.precision, s.port, s.share, s.device) == ("fp16", 1234, False, "cpu")  # flags win


@pytest.mark.parametrize("argv,env", [(["--precision", "int3"], {}), ([], {"CHATGLM_WEB_PRECISION": "int3"}),
                                      ([], {"CHATGLM_WEB_PORT": "abc"}), (["--auth", "nopassword"], {})])
def test_bad_settings_exit_with_a_message(argv, env, capsys):
    with pytest.raises(SystemExit):
        parse_settings(argv, environ=env)


def test_auto_precision_follows_the_hardware():
    fp16 = estimate_memory(SIX_B, "fp16")
    assert choose_precision("auto", "cuda", SIX_B, free_gpu_bytes=int(fp16 * GPU_HEADROOM) + 1, bf16_supported=True) == "bf16"
    assert choose_precision("auto", "cuda", SIX_B, free_gpu_bytes=int(fp16 * GPU_HEADROOM) + 1) == "fp16"
    assert choose_precision("auto", "cuda", SIX_B, free_gpu_bytes=8 * 2**30) == "4bit"
    assert choose_precision("auto", "cpu", SIX_B, free_cpu_bytes=64 * 2**30) == "fp32"
    assert choose_precision("auto", "cpu", SIX_B, free_cpu_bytes=20 * 2**30) == "bf16"
    assert choose_precision("8bit", "cuda", SIX_B, free_gpu_bytes=1) == "8bit"  # forced by the flag


def test_memory_estimates_for_chatglm3_6b():
    gib = {p: estimate_memory(SIX_B, p, SIX_B_EMBEDDINGS) / 2**30 for p in ("fp32", "fp16", "8bit", "4bit")}
    assert 23 < gib["fp32"] < 24 and 11.5 < gib["fp16"] < 12
    assert 6 < gib["8bit"] < 7 and 3.5 < gib["4bit"] < 4.5


def test_cuda_asked_without_cuda_is_an_error(monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        resolve_device("cuda")


def run_app(*args, env=None, timeout=120):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "app.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=environment)


def test_explicit_model_that_cannot_load_is_an_error_not_a_fallback(tmp_path):
    result = run_app("--model", str(tmp_path / "missing-model"), "--port", "0")
    assert result.returncode == 2
    assert "missing-model" in result.stderr and "offline demo" not in result.stderr.lower()
    result = run_app("--model", "THUDM/chatglm3-6b", "--device", "cpu")  # named explicitly, not cached here
    assert result.returncode == 2 and "cannot find or download" in result.stderr


def test_cuda_flag_without_gpu_exits_non_zero(chatglm3_checkpoint):
    result = run_app("--model", str(chatglm3_checkpoint), "--device", "cuda")
    assert result.returncode == 2 and "CUDA is not available" in result.stderr


@pytest.mark.slow
def test_offline_default_model_answers_paris(monkeypatch):
    """THUDM/chatglm3-6b is neither cached nor reachable here: the app starts with the offline demo model."""
    from chatglm_web.server import build_app

    settings = parse_settings(["--device", "cpu"], environ={})
    page, backend, _ = build_app(settings)
    try:
        assert backend.info.offline_demo and "SmolLM2" in backend.info.name
        assert any("offline" in note and "--model" in note for note in backend.info.notes)

        async def ask():
            text = ""
            async for event in backend.stream_chat([{"role": "user", "content": "What is the capital of France?"}],
                                                   SamplingParams(temperature=0, max_new_tokens=30)):
                if isinstance(event, TextDelta):
                    text += event.text
            return text

        assert "Paris" in asyncio.run(ask())
    finally:
        backend.engine.shutdown()
