"""Hugging Face Spaces: the README's front matter is valid Space metadata and matches what is tested."""

from __future__ import annotations

from pathlib import Path

import gradio
from huggingface_hub import SpaceCard

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
