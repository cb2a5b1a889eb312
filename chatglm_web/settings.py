"""Every setting of the app, declared once: ``Settings`` below. Each field says its default, its range or choices,
its help text and how it is given (an on/off flag, a secret also read from a file, a Gradio variable as fallback, a
default read from the environment). The command line (argparse), the ``CHATGLM_WEB_*`` variables, the checks, the
``--help`` text and README's table of options (``options_table()``, ``python -m chatglm_web.settings --markdown``)
all derive from that one declaration.

Precedence: a flag on the command line wins over its ``CHATGLM_WEB_*`` variable, which wins over Gradio's own
``GRADIO_SERVER_NAME`` / ``GRADIO_SERVER_PORT`` (host and port only; Hugging Face Spaces sets those), which win over
the default. ``--zero-gpu`` defaults to what the ``spaces`` package detects (``SPACES_ZERO_GPU``, set on ZeroGPU
hardware).

Every value is checked here, flag or variable alike: a bad one raises ``SettingsError`` whose one-line message names
the flag or variable, what it must be and what it got. An empty value means "none" only where none is the default
(``--auth``, ``--max-input-tokens``, ``--assets-dir``, ...); anywhere else it is an error.

The secrets (``--api-key``, ``--auth``, ``--backend-api-key``) can also come from a file: ``--api-key-file PATH``
(or ``CHATGLM_WEB_API_KEY_FILE``) and so on, its content without the final newline. A flag (the value or its file)
wins over the variables; a value and its file both given on the same level is an error.
``process_secrets.hide_secrets()`` then keeps them off the command line and out of the environment that child
processes inherit.

The limits' defaults (``DEFAULT_MAX_BATCH_SIZE``, ``DEFAULT_MAX_QUEUE``, ``DEFAULT_CONTEXT_LENGTH``, ...) are
declared here once; ``Settings.limits`` hands the limits on as one ``Limits`` object.

May import: ``generation`` (the range of ``--max-new-tokens``), nothing else of the package.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

DEFAULT_MODEL = "THUDM/chatglm3-6b"
PRECISIONS = ("auto", "4bit", "8bit", "fp16", "bf16", "fp32")

#: The limits' defaults, declared once: the engines, the backends and the flags all read them from here.
DEFAULT_MAX_BATCH_SIZE = 8  # replies generated together in one batch
DEFAULT_MAX_QUEUE = 32  # requests allowed to wait for a slot
DEFAULT_MAX_NEW_TOKENS = 2048  # upper limit of the max-new-tokens slider
DEFAULT_CONTEXT_LENGTH = 4096  # a model's context length when its config does not say
CHARS_PER_CONTEXT_TOKEN = 8  # default --max-input-chars: this many characters for each context token

MAX_SECRET_FILE_BYTES = 64 * 1024  # a secret file larger than this is a mistake (a wrong path)

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


# -- what the environment says (read by defaults and by other modules) ---------------------------------------------

def zero_gpu_detected(environ: Mapping[str, str] | None = None) -> bool:
    """The Space runs on ZeroGPU hardware: ``SPACES_ZERO_GPU`` as ``spaces.config`` reads it (1, t, true)."""
    value = (os.environ if environ is None else environ).get("SPACES_ZERO_GPU")
    return value is not None and value.lower() in ("1", "t", "true")


def default_cache_dir() -> Path:
    """Where the app keeps its files (the offline model, the browser-storage key).

    ``$CHATGLM_WEB_CACHE`` if set, else ``$XDG_CACHE_HOME/chatglm-web``, else ``~/.cache/chatglm-web``.
    """
    explicit = os.environ.get("CHATGLM_WEB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "chatglm-web"


def read_secret_file(path: str, source: str) -> str:
    """The secret in ``path`` (named by flag or variable ``source``), without surrounding whitespace and the final
    newline. ``SettingsError`` (one line) when it cannot be read, is empty or is not a small text file."""
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_SECRET_FILE_BYTES + 1)
    except OSError as error:
        raise SettingsError(f"{source}: cannot read {path}: {error.strerror or error}") from None
    if len(data) > MAX_SECRET_FILE_BYTES:
        raise SettingsError(f"{source}: {path} is larger than {MAX_SECRET_FILE_BYTES:,} bytes; it should hold one secret")
    try:
        value = data.decode("utf-8").strip()
    except UnicodeDecodeError:
        raise SettingsError(f"{source}: {path} is not UTF-8 text") from None
    if not value:
        raise SettingsError(f"{source}: {path} is empty")
    return value


# -- the declaration ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Option:
    """How one setting is given and checked: the ``metadata["option"]`` of its ``Settings`` field."""

    help: str  # one sentence; `backticks` mark code in README and are dropped in --help
    kind: str = "text"  # "text", "int", "flag" (--name / --no-name) or "choice"
    choices: tuple[str, ...] = ()
    minimum: int | None = None  # "int": the smallest allowed value
    maximum: int | None = None  # "int": the largest (None: no upper limit)
    bounds: Callable[[], tuple[int, int]] | None = None  # "int": (minimum, maximum) read when first needed
    check: Callable[[str], str | None] | None = None  # what the value must be ("must ..."), None when it is fine
    secret: bool = False  # also --<name>-file PATH / CHATGLM_WEB_<NAME>_FILE; never handed to the engine process
    fallback_env: str | None = None  # a variable read after ours (Gradio's own)
    env_default: Callable[[Mapping[str, str]], Any] | None = None  # the default, from the environment
    default_text: str | None = None  # the default as README shows it, where the value alone would not say
    metavar: str | None = None  # what the value looks like (`--auth user:pass`)

    def range(self) -> tuple[int, int | None]:
        """Smallest and largest allowed value of an "int" setting (None: no upper limit)."""
        if self.bounds is not None:
            return self.bounds()
        return (1 if self.minimum is None else self.minimum), self.maximum


def _setting(default, help: str, **option) -> Any:
    return field(default=default, metadata={"option": Option(help=help, **option)})


def _max_new_tokens_bounds() -> tuple[int, int]:
    """The server limit must be a value a request may ask for: the range of ``SamplingParams.max_new_tokens``."""
    from chatglm_web.generation import option

    spec = option("max_new_tokens")
    return int(spec.minimum), int(spec.maximum)


def _check_device(raw: str) -> str | None:
    return None if _DEVICE.fullmatch(raw) else f"must be auto, cpu, cuda or cuda:N (a torch device), got {raw!r}"


def _check_auth(raw: str) -> str | None:
    """The one check of a login (parsing and ``Settings.auth_pair``); the message never repeats the secret."""
    user, sep, password = raw.partition(":")
    return None if (user and sep and password) else "must look like user:password"


@dataclass(frozen=True)
class Limits:
    """How much the server takes on, as one object: what the engine admits and what a request may ask for."""

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_queue: int = DEFAULT_MAX_QUEUE
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_input_tokens: int | None = None  # None: the model's context length
    max_input_chars: int | None = None  # None: CHARS_PER_CONTEXT_TOKEN characters per context token


@dataclass
class Settings:
    """The app's settings. The fields with an ``Option`` are the flags, in the order ``--help`` and README list
    them; ``Settings(...)`` with keywords builds one without parsing (tests, benchmarks)."""

    model: str = _setting(
        DEFAULT_MODEL, "local folder or Hub id: ChatGLM3 (chatglm3-6b, -32k, -128k, -base), a native GLM "
        "checkpoint, or any chat model with a chat template")
    precision: str = _setting(
        "auto", "weights precision: `auto` (fp16/bf16 on a big enough GPU, 4-bit NF4 on a smaller one, the CPU "
        "otherwise), `4bit` (NF4, double quant), `8bit`, `fp16`, `bf16`, `fp32`", kind="choice", choices=PRECISIONS)
    device: str = _setting("auto", "`auto`, `cpu`, `cuda`, `cuda:1`, ...", check=_check_device)
    host: str = _setting("127.0.0.1", "address to listen on (`0.0.0.0` to reach it from other machines)",
                         fallback_env="GRADIO_SERVER_NAME")
    port: int = _setting(7860, "port to listen on", kind="int", minimum=0, maximum=65535,
                         fallback_env="GRADIO_SERVER_PORT")
    share: bool = _setting(False, "create a public gradio.live link", kind="flag")
    auth: str | None = _setting(
        None, "require a login (the page, and the API as HTTP Basic auth)", check=_check_auth, secret=True,
        metavar="user:pass")
    api_key: str | None = _setting(
        None, "key the OpenAI-compatible API (`/v1`) and `/metrics` require as `Authorization: Bearer KEY`",
        secret=True, metavar="KEY")
    max_input_chars: int | None = _setting(
        None, "longest message or system prompt in characters, checked before any tokenizing", kind="int",
        default_text=f"{CHARS_PER_CONTEXT_TOKEN} × context")
    max_input_tokens: int | None = _setting(
        None, "longest prompt (history included) sent to the model; older turns are dropped (system prompt kept) "
        "and the page says so", kind="int", default_text="model context")
    max_new_tokens: int = _setting(
        DEFAULT_MAX_NEW_TOKENS, "upper end of the max-new-tokens slider and of the API's `max_tokens`", kind="int",
        bounds=_max_new_tokens_bounds)
    max_batch_size: int = _setting(
        DEFAULT_MAX_BATCH_SIZE, "replies generated together in one batch; with `--backend`, requests sent to the "
        "server at once", kind="int")
    max_queue: int = _setting(
        DEFAULT_MAX_QUEUE, "requests allowed to wait for a slot; more get a 'busy, try again' message", kind="int",
        minimum=0)
    backend: str | None = _setting(
        None, "URL of an OpenAI-compatible server (vLLM, SGLang, another chatglm-web) that generates the replies; "
        "no weights are loaded here, `--model` only names the tokenizer and config", metavar="URL")
    backend_api_key: str | None = _setting(None, "bearer key for `--backend`", secret=True, metavar="KEY")
    zero_gpu: bool = _setting(
        False, "generate each reply in a `@spaces.GPU` call (Hugging Face ZeroGPU)", kind="flag",
        env_default=zero_gpu_detected, default_text="auto (`SPACES_ZERO_GPU`)")
    assets_dir: str | None = _setting(None, "folder with `branding.json`, logo and `style.css`",
                                      default_text="`./assets`")
    engine_process: bool = _setting(
        True, "run the model and its batching engine in a process of their own, so the web server's work never "
        "delays generation (ZeroGPU always runs in one process)", kind="flag")
    code_interpreter: bool = _setting(
        False, "offer the Code interpreter mode: code the model writes runs in a sandboxed Jupyter kernel per "
        "browser session (start-up fails in one line if the sandbox is not supported here)", kind="flag")
    mcp: bool = _setting(
        False, "also serve the chat and the tools as an MCP server at `/gradio_api/mcp/` (streamable HTTP; "
        "`/gradio_api/mcp/sse` for SSE clients), behind the same `--auth` login and `--api-key`", kind="flag")
    #: Not an option: --model/CHATGLM_WEB_MODEL was given, so never fall back to the offline model.
    model_explicit: bool = False

    @property
    def limits(self) -> Limits:
        return Limits(max_batch_size=self.max_batch_size, max_queue=self.max_queue,
                      max_new_tokens=self.max_new_tokens, max_input_tokens=self.max_input_tokens,
                      max_input_chars=self.max_input_chars)

    def without_secrets(self) -> Settings:
        """A copy for another process that needs none of them (the engine process)."""
        return replace(self, **{name: None for name in SECRET_SETTINGS})

    def secret_values(self) -> list[str]:
        """The secrets that are set (for ``process_secrets.hide_secrets``)."""
        return [value for value in (getattr(self, name) for name in SECRET_SETTINGS) if value]

    @property
    def auth_pair(self) -> tuple[str, str] | None:
        if not self.auth:
            return None
        _check(OPTIONS["auth"], self.auth, flag_name("auth"))
        user, _, password = self.auth.partition(":")
        return user, password


#: Each option's declaration, by field name, in the order of the flags.
OPTIONS: dict[str, Option] = {f.name: f.metadata["option"] for f in fields(Settings) if "option" in f.metadata}
#: The settings that are secrets: each also read from a file (``--<name>-file PATH``), none handed to the engine.
SECRET_SETTINGS = tuple(name for name, option in OPTIONS.items() if option.secret)
_DEFAULTS = {f.name: f.default for f in fields(Settings)}


def env_name(field_name: str) -> str:
    return "CHATGLM_WEB_" + field_name.upper()


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


#: The variables that hold the secrets (taken out of the environment once read).
SECRET_ENV_VARS = tuple(env_name(name) for name in SECRET_SETTINGS)


# -- checking one value -----------------------------------------------------------------------------------------------

def _check(option: Option, raw: str, source: str) -> None:
    problem = option.check(raw) if option.check else None
    if option.kind == "choice" and raw not in option.choices:
        problem = f"must be one of {', '.join(option.choices)}, got {raw!r}"
    if problem:
        raise SettingsError(f"{source} {problem}")


def _to_bool(raw: str, source: str) -> bool:
    text = raw.strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise SettingsError(f"{source}={raw!r} is not a boolean: use true/false, yes/no, on/off or 1/0")


def _to_int(option: Option, raw: str, source: str) -> int:
    try:
        value = int(raw.strip())
    except ValueError:
        raise SettingsError(f"{source}={raw!r} is not a whole number") from None
    low, high = option.range()
    if value < low or (high is not None and value > high):
        allowed = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise SettingsError(f"{source} must be {allowed}, got {value}")
    return value


def convert(name: str, raw: str, source: str):
    """``raw`` (from flag or variable ``source``) as the value of setting ``name``; SettingsError if unusable."""
    option = OPTIONS[name]
    if not raw.strip():
        if _DEFAULTS[name] is None:
            return None
        raise SettingsError(f"{source} is empty; give it a value or leave it unset for the default")
    if option.kind == "flag":
        return _to_bool(raw, source)
    if option.kind == "int":
        return _to_int(option, raw, source)
    _check(option, raw, source)
    return raw


# -- the command line and the environment -----------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse whose errors are a SettingsError (one line) instead of usage text and exit."""

    def error(self, message: str):
        raise SettingsError(f"{message} (see --help)")


def _variables(name: str, option: Option) -> list[str]:
    return [env_name(name)] + ([option.fallback_env] if option.fallback_env else [])


def _default_text(name: str, option: Option) -> str:
    if option.default_text is not None:
        return option.default_text
    default = _DEFAULTS[name]
    if isinstance(default, bool):
        return "on" if default else "off"
    return "none" if default is None else f"`{default}`"


def _plain(text: str) -> str:
    return text.replace("`", "").replace("%", "%%")


def _parser() -> _Parser:
    parser = _Parser(description="ChatGLM3 chat demo (Gradio). Every flag also has an environment variable; "
                                 "a flag wins over its variable.")
    for name, option in OPTIONS.items():
        details = f"default: {_default_text(name, option)}"
        if option.kind == "int":
            low, high = option.range()
            details = f"{low} to {high}, {details}" if high is not None else f"at least {low}, {details}"
        help_text = f"{option.help} ({details}) [env {', then '.join(_variables(name, option))}]"
        if option.kind == "flag":
            parser.add_argument(flag_name(name), action=argparse.BooleanOptionalAction, default=None,
                                help=_plain(help_text))
        else:
            metavar = "{" + ",".join(option.choices) + "}" if option.choices else option.metavar or name.upper()
            parser.add_argument(flag_name(name), default=None, metavar=metavar, help=_plain(help_text))
        if option.secret:
            file_name = name + "_file"
            parser.add_argument(flag_name(file_name), default=None, metavar="PATH",
                                help=f"file holding {flag_name(name)}'s value (kept off the command line) "
                                     f"[env {env_name(file_name)}]")
    return parser


def _candidates(name: str, option: Option, args, environ) -> Iterator[tuple[Any, str]]:
    """(value, source) in order of precedence: the flag (or its file), the variable (or its file), the fallback
    variable. A secret file is read only when its level is reached."""
    levels = [(flag_name, lambda key: getattr(args, key, None)), (env_name, lambda key: environ.get(env_name(key)))]
    for naming, lookup in levels:
        value, source = lookup(name), naming(name)
        if option.secret:
            path, path_source = lookup(name + "_file"), naming(name + "_file")
            if value is not None and path is not None:
                raise SettingsError(f"{source} and {path_source} are both set; give the secret one way")
            if path is not None:
                value, source = read_secret_file(path, path_source), path_source
        yield value, source
    if option.fallback_env:
        yield environ.get(option.fallback_env), option.fallback_env


def parse_settings(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from flags (``argv``, default sys.argv) and environment (``environ``, default os.environ).

    Raises ``SettingsError`` with a one-line message for any bad value; ``--help`` exits 0.
    """
    environ = os.environ if environ is None else environ
    args = _parser().parse_args(argv)
    values = {}
    for name, option in OPTIONS.items():
        for raw, source in _candidates(name, option, args, environ):
            if raw is not None:
                values[name] = raw if isinstance(raw, bool) else convert(name, raw, source)  # a flag's bool as it is
                break
        else:
            if option.env_default is not None:
                values[name] = option.env_default(environ)
    return Settings(**values, model_explicit=args.model is not None or env_name("model") in environ)


# -- README's table ---------------------------------------------------------------------------------------------------

def options_table() -> str:
    """README's table of options, made from the declaration (tests/test_settings.py checks README holds it)."""
    rows = ["| flag | env var | default | meaning |", "|---|---|---|---|"]
    for name, option in OPTIONS.items():
        flag = f"`{flag_name(name)}`"
        if option.kind == "flag":
            flag = f"`{flag_name(name)}` / `--no-{flag_name(name)[2:]}`"
        elif option.metavar:
            flag = f"`{flag_name(name)} {option.metavar}`"
        meaning = option.help
        if option.kind == "int":
            low, high = option.range()
            meaning += f" ({low}–{high})" if high is not None else f" (at least {low})"
        variables = ", then ".join(f"`{variable}`" for variable in _variables(name, option))
        rows.append(f"| {flag} | {variables} | {_default_text(name, option)} | {meaning} |")
        if option.secret:
            file_name = name + "_file"
            rows.append(f"| `{flag_name(file_name)} PATH` | `{env_name(file_name)}` | none | "
                        f"the same, read from a file (kept off the command line) |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    if sys.argv[1:] != ["--markdown"]:
        sys.exit("usage: python -m chatglm_web.settings --markdown   (prints README's table of options)")
    sys.stdout.write(options_table())
