"""Title, logo, colours, system prompt and example prompts, read from ``assets/``.

A team re-brands a demo by editing ``assets/branding.json``, replacing the logo file and
``assets/style.css``; no code changes. Everything is inlined into the page (the logo as a data
URI, system fonts only), so the page makes no request to any outside host.

Example prompts and the system prompt may be one list/string, or one per page language
(``{"en": ..., "zh": ...}``); ``Branding.examples_for(kind, lang)`` and ``system_prompt_for(lang)``
pick the visitor's.
"""

from __future__ import annotations

import base64
import html
import json
import mimetypes
from dataclasses import dataclass, field
from pathlib import Path

import gradio as gr

DEFAULT_ASSETS = Path(__file__).resolve().parent.parent / "assets"
# System fonts only, with the CJK and emoji fallbacks of every common platform (Linux: Debian's
# fonts-noto-cjk and fonts-noto-color-emoji, see the README).
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Noto Sans", "PingFang SC",
                "Hiragino Sans GB", "Microsoft YaHei", "Noto Sans CJK SC", "Source Han Sans SC", "sans-serif",
                "Apple Color Emoji", "Segoe UI Emoji", "Noto Color Emoji"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "Noto Sans Mono CJK SC", "monospace"]


@dataclass
class Branding:
    title: str = "ChatGLM3 Chat"
    description: str = ""
    logo_data_uri: str | None = None
    primary_hue: str = "blue"
    secondary_hue: str = "sky"
    neutral_hue: str = "slate"
    system_prompt: str = ""
    placeholder: str = ""
    input_placeholder: str = "Type a message…"
    examples: list[str] = field(default_factory=list)
    tool_examples: list[str] = field(default_factory=list)  # for Tools mode
    interpreter_examples: list[str] = field(default_factory=list)  # for Code interpreter mode
    css: str = ""
    localized: dict = field(default_factory=dict)  # {"examples": {"en": [...], "zh": [...]}, "system_prompt": ...}

    def examples_for(self, kind: str, lang: str) -> list[str]:
        """``kind`` ("examples", "tool_examples", "interpreter_examples") in the page language ``lang``."""
        return _pick(self.localized.get(kind), lang, getattr(self, kind))

    def system_prompt_for(self, lang: str) -> str:
        return _pick(self.localized.get("system_prompt"), lang, self.system_prompt)

    def header_html(self) -> str:
        logo = f'<img src="{self.logo_data_uri}" alt="" class="brand-logo">' if self.logo_data_uri else ""
        description = f'<p class="brand-description">{html.escape(self.description)}</p>' if self.description else ""
        return f'<div class="brand">{logo}<div><h1>{html.escape(self.title)}</h1>{description}</div></div>'

    def theme(self) -> gr.themes.Base:
        return gr.themes.Soft(primary_hue=self.primary_hue, secondary_hue=self.secondary_hue,
                              neutral_hue=self.neutral_hue, font=SYSTEM_FONTS, font_mono=MONO_FONTS)


def _pick(value, lang: str, default):
    """``value[lang]`` of a per-language value ("zh" or "zh-CN" for Chinese), else ``default``."""
    if not isinstance(value, dict):
        return default
    keys = ("zh-CN", "zh") if lang.startswith("zh") else ("en",)
    for key in keys:
        if key in value:
            return value[key]
    return default


def _examples(examples) -> list[str]:
    """A list of example prompts, or {"en": [...], "zh": [...]} flattened in order."""
    if isinstance(examples, dict):
        examples = [e for group in examples.values() for e in group]
    return [str(e) for e in examples]


def load_branding(assets_dir: str | Path | None = None) -> Branding:
    folder = Path(assets_dir) if assets_dir else DEFAULT_ASSETS
    config_path = folder / "branding.json"
    data = json.loads(config_path.read_text(encoding="utf-8")) if config_path.exists() else {}
    branding = Branding(**{k: v for k, v in data.items() if k in Branding.__dataclass_fields__
                           and k not in ("logo_data_uri", "css", "examples", "tool_examples",
                                         "interpreter_examples", "system_prompt", "localized")})
    for name in ("examples", "tool_examples", "interpreter_examples"):
        setattr(branding, name, _examples(data.get(name, [])))
        if isinstance(data.get(name), dict):
            branding.localized[name] = {lang: _examples(texts) for lang, texts in data[name].items()}
    system_prompt = data.get("system_prompt", "")
    if isinstance(system_prompt, dict):
        branding.localized["system_prompt"] = system_prompt
        system_prompt = _pick(system_prompt, "en", "")
    branding.system_prompt = system_prompt
    logo = folder / data.get("logo", "logo.svg")
    if logo.is_file():
        mime = mimetypes.guess_type(logo.name)[0] or "image/png"
        branding.logo_data_uri = f"data:{mime};base64,{base64.b64encode(logo.read_bytes()).decode()}"
    css = folder / data.get("css", "style.css")
    if css.is_file():
        branding.css = css.read_text(encoding="utf-8")
    return branding
