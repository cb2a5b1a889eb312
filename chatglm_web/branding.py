"""Title, logo, colours, system prompt and example prompts, read from ``assets/``.

A team re-brands a demo by editing ``assets/branding.json``, replacing the logo file and
``assets/style.css``; no code changes. Everything is inlined into the page (the logo as a data
URI, system fonts only), so the page makes no request to any outside host.
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
SYSTEM_FONTS = ["ui-sans-serif", "system-ui", "-apple-system", "Segoe UI", "Noto Sans", "PingFang SC",
                "Microsoft YaHei", "sans-serif"]
MONO_FONTS = ["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"]


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

    def header_html(self) -> str:
        logo = f'<img src="{self.logo_data_uri}" alt="" class="brand-logo">' if self.logo_data_uri else ""
        description = f'<p class="brand-description">{html.escape(self.description)}</p>' if self.description else ""
        return f'<div class="brand">{logo}<div><h1>{html.escape(self.title)}</h1>{description}</div></div>'

    def theme(self) -> gr.themes.Base:
        return gr.themes.Soft(primary_hue=self.primary_hue, secondary_hue=self.secondary_hue,
                              neutral_hue=self.neutral_hue, font=SYSTEM_FONTS, font_mono=MONO_FONTS)


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
                                         "interpreter_examples")})
    for name in ("examples", "tool_examples", "interpreter_examples"):
        setattr(branding, name, _examples(data.get(name, [])))
    logo = folder / data.get("logo", "logo.svg")
    if logo.is_file():
        mime = mimetypes.guess_type(logo.name)[0] or "image/png"
        branding.logo_data_uri = f"data:{mime};base64,{base64.b64encode(logo.read_bytes()).decode()}"
    css = folder / data.get("css", "style.css")
    if css.is_file():
        branding.css = css.read_text(encoding="utf-8")
    return branding
