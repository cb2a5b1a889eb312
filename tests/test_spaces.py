"""Hugging Face Spaces: what a Space gives the app, and what the app must do with it.

* README's front matter is valid Space metadata, and its Gradio is the tested one;
* ZeroGPU is detected as ``spaces`` detects it; ``--zero-gpu`` / CHATGLM_WEB_ZERO_GPU override it;
* the Hub cache goes to persistent storage (/data) before huggingface_hub is imported;
* on a Space the model comes from the Hub, the offline demo only when the Hub really fails;
* on ZeroGPU the precision comes from the hardware spaces describes, and the header shows it;
* started with the environment Spaces sets, the app listens there (reached here via 127.0.0.1);
* requirements.txt installs from wheels only (slow: asks PyPI).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import gradio
import httpx
import psutil
import pytest
import spaces
import torch
from gradio_client import Client
from huggingface_hub import SpaceCard
from server_harness import app_process, free_port

from chatglm_web.families import loading

from chatglm_web import spaces_env
from chatglm_web.families.chatglm3 import loader
from chatglm_web.families.loading import ModelLoadError
from chatglm_web.settings import Settings, SettingsError, parse_settings

ROOT = Path(__file__).resolve().parents[1]


def test_readme_front_matter_is_a_valid_space_card():
    card = SpaceCard.load(ROOT / "README.md")
    data = card.data.to_dict()
    assert data["sdk"] == "gradio" and data["app_file"] == "app.py"
    assert data["sdk_version"] == gradio.__version__, "the Space must run the Gradio version CI tested"
    assert data["models"] == ["THUDM/chatglm3-6b"]
    for key in ("title", "emoji", "colorFrom", "colorTo", "python_version", "license", "short_description"):
        assert data.get(key), key
    assert len(data["short_description"]) <= 60  # the Hub's limit
    assert (ROOT / data["app_file"]).is_file()


def test_the_lock_pins_the_gradio_of_the_front_matter():
    card = SpaceCard.load(ROOT / "README.md")
    assert f"gradio=={card.data.sdk_version}\n" in (ROOT / "requirements.lock").read_text()


# -- ZeroGPU detection and settings ------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["true", "True", "TRUE", "1", "t", "T", "yes", "on", "false", "0", "", None])
def test_zero_gpu_is_detected_exactly_as_the_spaces_package_detects_it(value):
    environ = {} if value is None else {"SPACES_ZERO_GPU": value}
    assert spaces_env.zero_gpu_detected(environ) == spaces.config.boolean(value)


def test_zero_gpu_mode_flag_variable_and_detection():
    assert parse_settings([], environ={}).zero_gpu is False
    assert parse_settings([], environ={"SPACES_ZERO_GPU": "true"}).zero_gpu is True
    assert parse_settings(["--no-zero-gpu"], environ={"SPACES_ZERO_GPU": "true"}).zero_gpu is False
    assert parse_settings([], environ={"SPACES_ZERO_GPU": "true", "CHATGLM_WEB_ZERO_GPU": "off"}).zero_gpu is False
    assert parse_settings(["--zero-gpu"], environ={}).zero_gpu is True
    assert parse_settings([], environ={"CHATGLM_WEB_ZERO_GPU": "yes"}).zero_gpu is True
    with pytest.raises(SettingsError, match="CHATGLM_WEB_ZERO_GPU='maybe' is not a boolean"):
        parse_settings([], environ={"CHATGLM_WEB_ZERO_GPU": "maybe"})


# -- persistent storage --------------------------------------------------------------------------------------------

def test_the_hub_cache_goes_to_persistent_storage_on_a_space(tmp_path):
    storage = tmp_path / "data"
    storage.mkdir()
    space = {"SPACE_ID": "someone/chatglm3"}
    environ = dict(space)
    assert spaces_env.use_persistent_storage(environ, storage) == storage
    assert environ == {**space, "HF_HOME": str(storage / ".huggingface"), "CHATGLM_WEB_CACHE": str(storage / "chatglm-web")}
    chosen = {**space, "HF_HOME": "/somewhere/else"}
    spaces_env.use_persistent_storage(chosen, storage)
    assert chosen["HF_HOME"] == "/somewhere/else", "an HF_HOME the Space sets wins"
    for environ, folder in [({}, storage), (dict(space), tmp_path / "no-storage"), (dict(space), tmp_path / "file")]:
        (tmp_path / "file").write_text("")
        assert spaces_env.use_persistent_storage(environ, folder) is None and "HF_HOME" not in environ


def test_app_py_sets_the_cache_before_huggingface_hub_is_imported(tmp_path):
    """huggingface_hub reads HF_HOME once, on import: app.py must choose it before anything imports the Hub."""
    script = ("import os, sys; from pathlib import Path; from chatglm_web import spaces_env; "
              "spaces_env.PERSISTENT_STORAGE = Path(os.environ['STORAGE']); "
              "assert 'huggingface_hub' not in sys.modules; import app; "
              "from huggingface_hub import constants; print(constants.HF_HUB_CACHE)")
    env = {**app_env(), "SPACE_ID": "someone/chatglm3", "STORAGE": str(tmp_path)}
    env.pop("HF_HOME", None), env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == str(tmp_path / ".huggingface" / "hub")


# -- the model: Hub first on a Space ----------------------------------------------------------------------------

@pytest.fixture
def model_sources(monkeypatch, tmp_path):
    """The Hub and the cache as the loader sees them: each attempt is recorded, failures on demand."""
    attempts, failing = [], set()

    def resolve_checkpoint(model_id, *, local_files_only=False):
        source = "cache" if local_files_only else "hub"
        attempts.append(source)
        if source in failing:
            raise OSError(f"the {source} failed")
        return tmp_path / source

    def quick_check():
        attempts.append("tcp-check")
        return False  # a quick reachability check that fails (slow network, firewall): must not decide on a Space

    monkeypatch.setattr(loader, "resolve_checkpoint", resolve_checkpoint)
    monkeypatch.setattr(loading, "hub_reachable", quick_check)
    monkeypatch.setattr(loading, "load_from_folder", lambda folder, settings, name: folder.name)
    monkeypatch.setattr(loading, "load_offline_demo", lambda settings: "offline demo")
    return attempts, failing


def test_on_a_space_the_model_comes_from_the_hub_and_the_demo_only_when_the_hub_really_fails(model_sources,
                                                                                           monkeypatch):
    attempts, failing = model_sources
    settings = Settings()  # the default model, not named explicitly
    monkeypatch.setenv("SPACE_ID", "someone/chatglm3")
    assert loading.load_chat_model(settings) == "hub" and attempts == ["hub"]
    failing.add("hub")
    attempts.clear()
    assert loading.load_chat_model(settings) == "cache" and attempts == ["hub", "cache"]
    failing.add("cache")
    attempts.clear()
    assert loading.load_chat_model(settings) == "offline demo" and attempts == ["hub", "cache"]
    monkeypatch.delenv("SPACE_ID")  # elsewhere: the cache first, then the quick check keeps an air-gapped start fast
    attempts.clear()
    assert loading.load_chat_model(settings) == "offline demo" and attempts == ["cache", "tcp-check"]


# -- precision and the header on ZeroGPU ----------------------------------------------------------------------------

def test_zero_gpu_picks_bf16_from_the_hardware_without_cuda_in_the_process(chatglm3_checkpoint, monkeypatch):
    """On ZeroGPU the main process has no CUDA; ``spaces`` answers for the GPU a call gets (as patched here)."""
    h200_slice = SimpleNamespace(name="NVIDIA H200 MIG 3g.71gb", total_memory=74625056768, major=9)

    def no_cuda_here(*args, **kwargs):
        raise AssertionError("CUDA was initialised in the main process")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *args: h200_slice)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: h200_slice.name)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", no_cuda_here)
    zero = Settings(precision="auto", zero_gpu=True)
    assert loading._plan(chatglm3_checkpoint, zero)[:2] == ("cuda", "bf16")
    assert spaces_env.hardware_label("cuda", zero_gpu=True) == "ZeroGPU · NVIDIA H200 MIG 3g.71gb"
    with pytest.raises(ModelLoadError, match="ZeroGPU mode loads 16- or 32-bit weights"):
        loading._plan(chatglm3_checkpoint, Settings(precision="4bit", zero_gpu=True))


# -- the app as a Space starts it ----------------------------------------------------------------------------------

def app_env() -> dict:
    """This environment without app, Gradio or Spaces settings; the Hub offline."""
    return {**{k: v for k, v in os.environ.items()
               if not k.startswith(("CHATGLM_WEB_", "GRADIO_SERVER_", "SPACE", "HF_HOME"))},
            "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}


def test_the_app_started_as_a_zero_gpu_space_listens_where_spaces_route(long_reply_checkpoint):
    port = free_port()
    space = {"SPACE_ID": "someone/chatglm3", "GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": str(port),
             "CHATGLM_WEB_MODEL": str(long_reply_checkpoint), "CHATGLM_WEB_DEVICE": "cpu",
             "CHATGLM_WEB_ZERO_GPU": "true"}  # ZeroGPU mode forced: off ZeroGPU hardware spaces.GPU passes through
    with app_process(["app.py"], cwd=ROOT, env={**app_env(), **space}) as app:
        listening = {c.laddr for c in psutil.Process(app.pid).net_connections("tcp") if c.status == "LISTEN"}
        assert ("0.0.0.0", port) in listening, listening
        config = httpx.get(f"http://127.0.0.1:{port}/config", timeout=30).json()
        header = [c["props"]["value"] for c in config["components"] if c["props"].get("elem_id") == "model-title"][0]
        assert "fp32 · cpu · " in header and "ZeroGPU mode" in header   # the top bar: precision · device
        reply, stats = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(
            "Hello", "", 0.8, 0.8, 6, 0, 1.0, 1, api_name="/chat")
        assert reply and "reply 6 tokens" in stats


# -- requirements.txt on Spaces -----------------------------------------------------------------------------------

@pytest.mark.slow
def test_requirements_install_from_wheels_only(tmp_path):
    """A Space runs ``pip install -r requirements.txt`` on Linux x86_64 (Python 3.11, as the front matter says):
    every package, at its locked version, must come as a wheel; nothing may need compiling."""
    card = SpaceCard.load(ROOT / "README.md")
    assert card.data.python_version == f"{sys.version_info.major}.{sys.version_info.minor}" and sys.platform == "linux"
    report = tmp_path / "report.json"
    # --isolated: PyPI as a Space sees it, without this machine's pip configuration
    result = subprocess.run([sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--ignore-installed",
                             "--only-binary=:all:", "--index-url", "https://pypi.org/simple", "-r",
                             "requirements.txt", "--report", str(report), "--quiet"],
                            cwd=ROOT, capture_output=True, text=True, timeout=540)
    assert result.returncode == 0, result.stderr[-3000:]
    install = json.loads(report.read_text())["install"]
    assert all(item["download_info"]["url"].endswith(".whl") for item in install)
    pinned = {item["metadata"]["name"].lower(): item["metadata"]["version"] for item in install}
    lock = (ROOT / "requirements.lock").read_text()
    for name in ("torch", "transformers", "gradio", "spaces"):
        assert f"{name}=={pinned[name]}\n" in lock, f"{name} {pinned[name]} is not the locked version"
