"""Load a ChatGLM3 checkpoint (local folder or Hub id) as transformers' native ``GlmForCausalLM``.

No file from the checkpoint is imported or executed: ``config.json`` is read as JSON and
mapped to ``GlmConfig``, ``tokenizer.model`` is read by sentencepiece, and the weights stream
through ``from_pretrained`` with the ChatGLM3 -> GLM renames registered for that one call.
Checkpoints already in native format (``model_type: glm``) load as they are.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from transformers import GlmForCausalLM

from chatglm_web.families.chatglm3.config import to_glm_config
from chatglm_web.families.chatglm3.tokenizer import ChatGLM3Tokenizer
from chatglm_web.families.chatglm3.weights import chatglm3_weight_mapping

log = logging.getLogger(__name__)

# Everything a ChatGLM3 load needs from a Hub repository; the *.py remote code is never fetched.
_ALLOW_PATTERNS = ["config.json", "tokenizer.model", "tokenizer_config.json", "generation_config.json",
                   "*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json"]


def resolve_checkpoint(model_id: str, *, local_files_only: bool = False) -> Path:
    """A local folder as is, or the Hub snapshot folder of ``model_id`` (downloaded if needed).

    When a repository ships both ``.bin`` and safetensors shards, only the safetensors are fetched.
    """
    path = Path(model_id).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import list_repo_files, snapshot_download

    allow = list(_ALLOW_PATTERNS)
    if not local_files_only:
        files = list_repo_files(model_id)
        if any(name.endswith(".safetensors") for name in files):
            allow = [p for p in allow if ".bin" not in p]
    return Path(snapshot_download(model_id, allow_patterns=allow, local_files_only=local_files_only))


def read_config(folder: Path) -> dict:
    return json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))


def is_chatglm_checkpoint(folder: Path) -> bool:
    return read_config(folder).get("model_type") in ("chatglm", "glm")


def load_glm_model(folder: Path, tokenizer: ChatGLM3Tokenizer, **from_pretrained_kwargs) -> GlmForCausalLM:
    """Build the native model from a chatglm (converted while loading) or glm folder.

    ``from_pretrained_kwargs`` go to ``GlmForCausalLM.from_pretrained`` (dtype, device_map,
    quantization_config, ...).
    """
    raw = read_config(folder)
    if raw.get("model_type") == "glm":
        return GlmForCausalLM.from_pretrained(folder, **from_pretrained_kwargs)
    if raw.get("model_type") != "chatglm":
        raise ValueError(f"{folder} is not a ChatGLM checkpoint (model_type={raw.get('model_type')!r})")
    config = to_glm_config(raw, tokenizer.special_token_ids, dtype=raw.get("torch_dtype"))
    with chatglm3_weight_mapping():
        model = GlmForCausalLM.from_pretrained(folder, config=config, **from_pretrained_kwargs)
    # transformers remembers the load-time conversions and would reverse them in save_pretrained, writing
    # original ChatGLM names under a native GLM config. Forgetting them makes the converted model save natively.
    # There is no public way (save_pretrained(save_original_format=False) would put the burden on every caller):
    # the private attribute is guarded by tests/chatglm3/test_loading.py, whose failure names it.
    if not hasattr(model, "_weight_conversions"):
        log.warning("transformers no longer sets model._weight_conversions: save this model with "
                    "save_pretrained(..., save_original_format=False) to get native GLM names")
    model._weight_conversions = []
    return model


def set_generation_defaults(model: GlmForCausalLM, tokenizer: ChatGLM3Tokenizer) -> None:
    """ChatGLM3's official defaults: sampling, top_p 0.8, temperature 0.8, stop on </s>, <|user|>, <|observation|>.

    transformers would otherwise derive a generation config from the original config.json (eos 2 only).
    """
    gen = model.generation_config
    gen.eos_token_id = list(tokenizer.stop_token_ids)
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = None
    gen.do_sample, gen.temperature, gen.top_p = True, 0.8, 0.8
    gen.max_length = model.config.max_position_embeddings
