"""Hugging Face Spaces: what the hosting environment says, read in one place.

    prepare_process(argv)          app.py, first thing: Hub cache in /data, ``import spaces`` on ZeroGPU
    on_spaces()                    SPACE_ID is set (every Space has it)
    zero_gpu_detected(environ)     SPACES_ZERO_GPU, read exactly as the ``spaces`` package reads it
    hardware_label(device, zero)   what the page header shows as the device

Spaces route to ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT``, which settings.py honours. ``zero_gpu_detected``
lives in settings.py (it is ``--zero-gpu``'s default) and is re-exported here; which engine serves in ZeroGPU mode
is server.py's choice. May import: ``settings`` only.
"""

from __future__ import annotations

import os
from pathlib import Path

from chatglm_web.settings import SettingsError, parse_settings, zero_gpu_detected  # noqa: F401 (re-exported)

#: A Space's persistent storage, when it has some (a paid add-on): kept across restarts.
PERSISTENT_STORAGE = Path("/data")


def on_spaces(environ=None) -> bool:
    """This process runs on Hugging Face Spaces."""
    return bool((os.environ if environ is None else environ).get("SPACE_ID"))


def use_persistent_storage(environ=None, storage: Path | None = None) -> Path | None:
    """On a Space with writable ``storage``, keep the Hub cache and the offline model there.

    Sets ``HF_HOME`` (unless already set) and ``CHATGLM_WEB_CACHE`` (unless set), so a restart
    does not download 12 GB again. Must run before ``huggingface_hub`` is imported (it reads
    ``HF_HOME`` once). Returns the storage folder used, or None.
    """
    environ = os.environ if environ is None else environ
    storage = PERSISTENT_STORAGE if storage is None else storage
    if not on_spaces(environ) or not storage.is_dir() or not os.access(storage, os.W_OK | os.X_OK):
        return None
    environ.setdefault("HF_HOME", str(storage / ".huggingface"))
    environ.setdefault("CHATGLM_WEB_CACHE", str(storage / "chatglm-web"))
    return storage


def prepare_process(argv: list[str] | None = None) -> None:
    """What must happen before anything imports huggingface_hub or touches CUDA.

    The Hub cache goes to persistent storage on a Space; in ZeroGPU mode ``spaces`` is imported
    first (it patches torch so that CUDA is only ever initialised inside ``@spaces.GPU`` calls).
    Bad settings, or a ``spaces`` that cannot be imported, are left for ``server.main`` to report
    as its one-line error.
    """
    use_persistent_storage()
    try:
        zero_gpu = parse_settings(argv).zero_gpu
    except SettingsError:
        return
    if zero_gpu:
        try:
            import spaces  # noqa: F401
        except Exception:  # imported again when the engine is chosen, and reported there
            pass


def hardware_label(device: str, zero_gpu: bool = False) -> str:
    """The device as the header shows it: ``cuda · NVIDIA A10G``, ``ZeroGPU · NVIDIA H200 ...``, ``cpu · 8 cores``.

    On ZeroGPU the main process has no GPU; ``spaces`` answers ``get_device_name`` with the
    hardware the calls will get.
    """
    if device.startswith("cuda"):
        import torch

        name = torch.cuda.get_device_name(torch.device(device))
        return f"ZeroGPU · {name}" if zero_gpu else f"{device} · {name}"
    label = f"{device} · {os.cpu_count()} cores"
    return f"{label} · ZeroGPU mode" if zero_gpu else label

