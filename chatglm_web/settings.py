"""Command-line flags, each also settable by an environment variable (for Hugging Face Spaces).

Precedence: a flag on the command line wins over its ``CHATGLM_WEB_*`` variable, which wins
over Gradio's own ``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT`` (host and port only; Hugging
Face Spaces sets those), which win over the default. ``--zero-gpu`` defaults to what the
``spaces`` package detects (``SPACES_ZERO_GPU``, set on ZeroGPU hardware).

Every value is checked here, flag or variable alike: a bad one raises ``SettingsError`` whose
one-line message names the flag or variable, what it must be and what it got. An empty value
means "none" only where none is a valid value (``--auth``, ``--max-input-tokens``,
``--assets-dir``); anywhere else it is an error.

The secrets (``--api-key``, ``--auth``, ``--backend-api-key``) can also come from a file:
``--api-key-file PATH`` (or ``CHATGLM_WEB_API_KEY_FILE``) and so on, its content without the final
newline. A flag (the value or its file) wins over the variables; a value and its file both given
on the same level is an error. ``process_secrets.hide_secrets()`` then keeps them off the command
line and out of the environment that child processes inherit.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass, fields, replace

DEFAULT_MODEL = "THUDM/chatglm3-6b"
PRECISIONS = ("auto", "4bit", "8bit", "fp16", "bf16", "fp32")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_DEVICE = re.compile(r"[a-z]+(:\d+)?")


class StartupError(Exception):
    """The app cannot start. The message says why, is meant for the user and is shown as one line (exit code 2)."""


class SettingsError(StartupError, ValueError):
    """A flag or environment variable has a value the app cannot use."""


def error_line(error: BaseException) -> str:
    """``error`` as one log line: a StartupError's message as it is, anything else with its type in front."""
    text = " ".join(str(error).split())
    if isinstance(error, StartupError):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


@dataclass
class Settings:
    model: str = DEFAULT_MODEL
    precision: str = "auto"
    device: str = "auto"
    host: str = "127.0.0.1"
    port: int = 7860
    share: bool = False
    auth: str | None = None  # "user:pass"
    max_input_tokens: int | None = None
    max_input_chars: int | None = None  # None: 8 characters per context token
    max_new_tokens: int = 2048
    max_batch_size: int = 8
    max_queue: int = 32
    assets_dir: str | None = None
    api_key: str | None = None
    backend: str | None = None  # URL of an OpenAI-compatible server that generates instead of a local model
    backend_api_key: str | None = None
    zero_gpu: bool = False  # each reply in a @spaces.GPU call (zero_gpu.py) instead of the batching engine
    engine_process: bool = True  # the batching engine and the model in a process of their own (engine_process.py)
    code_interpreter: bool = False  # offer the Code interpreter mode (model-written code runs in a sandbox)
    model_explicit: bool = False  # --model/CHATGLM_WEB_MODEL given: never fall back to the offline model

    def without_secrets(self) -> "Settings":
        """A copy for another process that needs none of them (the engine process)."""
        return replace(self, **{name: None for name in SECRET_SETTINGS})

    @property
    def auth_pair(self) -> tuple[str, str] | None:
        if not self.auth:
            return None
        user, sep, password = self.auth.partition(":")
        if not sep or not user or not password:
            raise SettingsError("--auth must look like user:password")
        return user, password


# field -> help
_HELP = {
    "model": "local folder or Hub id of ChatGLM3 or any chat model with a chat template",
    "precision": "weights precision; auto = fp16/bf16 on a big enough GPU, 4-bit NF4 on a smaller one, CPU otherwise",
    "device": "auto, cpu, cuda, cuda:1, ...",
    "host": "address to listen on (0.0.0.0 to reach it from other machines)",
    "port": "port to listen on",
    "share": "create a public gradio.live link",
    "auth": "require a login, user:password",
    "max_input_tokens": "longest prompt (history included) sent to the model; older turns are dropped",
    "max_input_chars": "longest message or system prompt in characters, checked before tokenizing "
                       "(default: 8 per context token)",
    "max_new_tokens": "upper limit of the max-new-tokens slider",
    "max_batch_size": "replies generated together in one batch",
    "max_queue": "requests allowed to wait for a slot; more get a 'busy, try again' message",
    "assets_dir": "folder with branding.json, logo and style.css (default: ./assets)",
    "api_key": "key the OpenAI-compatible API (/v1) and /metrics require as 'Authorization: Bearer KEY'",
    "backend": "URL of an OpenAI-compatible server (vLLM, SGLang, another chatglm-web) that generates the replies; "
               "no weights are loaded here, --model only names the tokenizer and config",
    "backend_api_key": "bearer key for --backend",
    "engine_process": "run the model and its batching engine in a process of their own, so the web server's work "
                      "never delays generation (--no-engine-process: one process; ZeroGPU always uses one)",
    "zero_gpu": "generate each reply in a @spaces.GPU call (Hugging Face ZeroGPU); "
                "default: on when SPACES_ZERO_GPU says the Space runs on ZeroGPU",
    "code_interpreter": "offer the Code interpreter mode: code the model writes runs in a sandboxed Jupyter kernel "
                        "per browser session (start-up fails if the sandbox is not supported here)",
}
_FLAGS = ("share", "zero_gpu", "code_interpreter", "engine_process")  # on/off flags: --name / --no-name
SECRET_SETTINGS = ("api_key", "auth", "backend_api_key")  # each also read from a file: --<name>-file PATH
#: Gradio's own variables, read after ours (Hugging Face Spaces sets them).
_GRADIO_ENV = {"host": "GRADIO_SERVER_NAME", "port": "GRADIO_SERVER_PORT"}


def env_name(field_name: str) -> str:
    return "CHATGLM_WEB_" + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _int_range(name: str) -> tuple[int, int | None]:
    """Smallest and largest allowed value of an integer setting (None: no upper limit)."""
    if name == "max_new_tokens":
        from chatglm_web.generation import option

        spec = option("max_new_tokens")  # the server limit must be a value a request may ask for
        return int(spec.minimum), int(spec.maximum)
    return {"port": (0, 65535), "max_queue": (0, None)}.get(name, (1, None))


def _to_bool(raw: str, source: str) -> bool:
    text = raw.strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise SettingsError(f"{source}={raw!r} is not a boolean: use true/false, yes/no, on/off or 1/0")


def _to_int(name: str, raw: str, source: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise SettingsError(f"{source}={raw!r} is not a whole number") from None
    low, high = _int_range(name)
    if value < low or (high is not None and value > high):
        allowed = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise SettingsError(f"{source} must be {allowed}, got {value}")
    return value


def convert(name: str, raw: str, source: str):
    """``raw`` (from flag or variable ``source``) as the value of setting ``name``; SettingsError if unusable."""
    kind = {field.name: field.type for field in fields(Settings)}[name]
    if not raw.strip():
        if "None" in str(kind):
            return None
        raise SettingsError(f"{source} is empty; give it a value or leave it unset for the default")
    if kind in ("bool", bool):
        return _to_bool(raw, source)
    if kind in ("int", "int | None", int):
        return _to_int(name, raw, source)
    if name == "precision" and raw not in PRECISIONS:
        raise SettingsError(f"{source} must be one of {', '.join(PRECISIONS)}, got {raw!r}")
    if name == "device" and not _DEVICE.fullmatch(raw):
        raise SettingsError(f"{source} must be auto, cpu, cuda or cuda:N (a torch device), got {raw!r}")
    if name == "auth":
        user, sep, password = raw.partition(":")
        if not (user and sep and password):
            raise SettingsError(f"{source} must look like user:password")
    return raw


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are a SettingsError (one line) instead of usage text and exit."""

    def error(self, message: str):
        raise SettingsError(f"{message} (see --help)")


def _parser() -> _Parser:
    parser = _Parser(description="ChatGLM3 chat demo (Gradio)")
    for name, help_text in _HELP.items():
        env = env_name(name) + (f", then {_GRADIO_ENV[name]}" if name in _GRADIO_ENV else "")
        help_text = f"{help_text} [env {env}]"
        if name in _FLAGS:
            parser.add_argument(flag_name(name), action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            metavar = "{" + ",".join(PRECISIONS) + "}" if name == "precision" else name.upper()
            parser.add_argument(flag_name(name), default=None, metavar=metavar, help=help_text)
    for name in SECRET_SETTINGS:
        parser.add_argument(flag_name(name + "_file"), default=None, metavar="PATH",
                            help=f"file holding {flag_name(name)}'s value (kept off the command line) "
                                 f"[env {env_name(name + '_file')}]")
    return parser


def _secret_candidates(name: str, args, environ) -> list[tuple[str | None, str]]:
    """(value, source) for a secret: the flag or its file, then the variable or its file (read when it is the
    first one set)."""
    from chatglm_web.process_secrets import read_secret_file

    file_name = name + "_file"
    levels = [((getattr(args, name), flag_name(name)), (getattr(args, file_name), flag_name(file_name))),
              ((environ.get(env_name(name)), env_name(name)), (environ.get(env_name(file_name)), env_name(file_name)))]
    for (value, source), (path, path_source) in levels:
        if value is not None and path is not None:
            raise SettingsError(f"{source} and {path_source} are both set; give the secret one way")
        if path is not None:
            return [(read_secret_file(path, path_source), path_source)]
        if value is not None:
            return [(value, source)]
    return []


def parse_settings(argv: list[str] | None = None, environ: dict | None = None) -> Settings:
    """Settings from flags (``argv``, default sys.argv) and environment (``environ``, default os.environ).

    Raises ``SettingsError`` with a one-line message for any bad value; ``--help`` exits 0.
    """
    environ = os.environ if environ is None else environ
    args = _parser().parse_args(argv)
    values = {}
    for name in _HELP:
        flag_value = getattr(args, name)
        if isinstance(flag_value, bool):
            values[name] = flag_value
            continue
        candidates = [(flag_value, flag_name(name)), (environ.get(env_name(name)), env_name(name))]
        if name in SECRET_SETTINGS:
            candidates = _secret_candidates(name, args, environ)
        if name in _GRADIO_ENV:
            candidates.append((environ.get(_GRADIO_ENV[name]), _GRADIO_ENV[name]))
        for raw, source in candidates:
            if raw is not None:
                values[name] = convert(name, raw, source)
                break
    if "zero_gpu" not in values:
        from chatglm_web.spaces_env import zero_gpu_detected

        values["zero_gpu"] = zero_gpu_detected(environ)
    settings = Settings(**values)
    settings.model_explicit = args.model is not None or env_name("model") in environ
    return settings
