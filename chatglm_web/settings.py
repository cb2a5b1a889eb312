"""Command-line flags, each also settable by an environment variable (for Hugging Face Spaces).

A flag on the command line wins over its environment variable, which wins over the default.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields

DEFAULT_MODEL = "THUDM/chatglm3-6b"
PRECISIONS = ("auto", "4bit", "8bit", "fp16", "bf16", "fp32")


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
    max_new_tokens: int = 2048
    max_batch_size: int = 8
    max_queue: int = 32
    assets_dir: str | None = None
    model_explicit: bool = False  # --model/CHATGLM_WEB_MODEL given: never fall back to the offline model

    @property
    def auth_pair(self) -> tuple[str, str] | None:
        if not self.auth:
            return None
        user, sep, password = self.auth.partition(":")
        if not sep or not user or not password:
            raise SystemExit("--auth must look like user:password")
        return user, password


# flag -> (env var, help)
_HELP = {
    "model": "local folder or Hub id of ChatGLM3 or any chat model with a chat template",
    "precision": "weights precision; auto = fp16/bf16 on a big enough GPU, 4-bit NF4 on a smaller one, CPU otherwise",
    "device": "auto, cpu, cuda, cuda:1, ...",
    "host": "address to listen on (0.0.0.0 to reach it from other machines)",
    "port": "port to listen on",
    "share": "create a public gradio.live link",
    "auth": "require a login, user:password",
    "max_input_tokens": "longest prompt (history included) sent to the model; older turns are dropped",
    "max_new_tokens": "upper limit of the max-new-tokens slider",
    "max_batch_size": "replies generated together in one batch",
    "max_queue": "requests allowed to wait for a slot; more get a 'busy, try again' message",
    "assets_dir": "folder with branding.json, logo and style.css (default: ./assets)",
}


def env_name(field_name: str) -> str:
    return "CHATGLM_WEB_" + field_name.upper()


def _parse_bool(text: str) -> bool:
    return text.strip().lower() in ("1", "true", "yes", "on")


def parse_settings(argv: list[str] | None = None, environ: dict | None = None) -> Settings:
    environ = os.environ if environ is None else environ
    defaults = Settings()
    parser = argparse.ArgumentParser(description="ChatGLM3 chat demo (Gradio)")
    for field in fields(Settings):
        if field.name not in _HELP:
            continue
        flag = "--" + field.name.replace("_", "-")
        env = env_name(field.name)
        help_text = f"{_HELP[field.name]} [env {env}]"
        if field.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
            continue
        kind = int if field.type in ("int", "int | None") else str
        choices = PRECISIONS if field.name == "precision" else None
        parser.add_argument(flag, type=kind, default=None, choices=choices, help=help_text)
    args = parser.parse_args(argv)

    values = {}
    for field in fields(Settings):
        if field.name not in _HELP:
            continue
        value = getattr(args, field.name)
        if value is None and env_name(field.name) in environ:
            raw = environ[env_name(field.name)]
            try:
                if field.type in ("bool", bool):
                    value = _parse_bool(raw)
                elif field.type in ("int", "int | None"):
                    value = int(raw) if raw.strip() else None
                else:
                    value = raw
            except ValueError:
                parser.error(f"{env_name(field.name)}={raw!r} is not a whole number")
            if field.name == "precision" and value not in PRECISIONS:
                parser.error(f"{env_name(field.name)} must be one of {', '.join(PRECISIONS)}")
        values[field.name] = getattr(defaults, field.name) if value is None else value
    settings = Settings(**values)
    settings.model_explicit = args.model is not None or env_name("model") in environ
    settings.auth_pair  # validate early
    return settings
