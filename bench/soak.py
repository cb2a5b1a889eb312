"""Soak test (not in CI): the real app under steady use for a while; does its memory stay flat?

    python bench/soak.py [--minutes 10] [--clients 4] [--tokens 96]

Starts ``app.py`` as its own process on a generated ChatGLM3-format checkpoint
(``tests/synthetic_checkpoints.py``; stop tokens made unlikely so replies run to their
max_new_tokens), then runs ``--clients`` clients against Gradio's HTTP API for ``--minutes``.
Each client holds multi-turn conversations (history kept by the server per session, so
context fitting is exercised), varies the sampling settings, leaves one reply in ten mid-stream
(a closed tab) and now and then sends a message the server must refuse (over the character
limit, a lone surrogate, an empty message). The server's RSS (psutil) is printed at the start
(after one warm-up reply), every ``--every`` seconds, and at the end, with the request counts.

Exit status 1 when the server died, stopped answering, or any request failed unexpectedly.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import httpx  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402

from synthetic_checkpoints import TinyChatGLM3, write_checkpoint  # noqa: E402
from server_harness import chat_args, chat_over_http, dir_bytes, free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
NO_STOP = {2: -30.0, "<|user|>": -30.0, "<|observation|>": -30.0}
SPEC = TinyChatGLM3(hidden_size=128, num_layers=4, num_attention_heads=4, kv_channels=32, multi_query_group_num=2,
                    ffn_hidden_size=256, seq_length=2048)
MAX_INPUT_CHARS = 4000

PROMPTS = [
    "Hello, how are you today?",
    "What is the capital of France?",
    "Please write a short poem about the sea and the sky.",
    "请帮我写一首关于春天的诗。",
    "北京是中国的首都吗？",
    "def add(a, b):\n    return a + b\n\nExplain this code.",
    "Numbers: 1 2 3 42 100 2024 3.14159 — what comes next?",
    "Summarize this: " + "The quick brown fox jumps over the lazy dog. " * 40,
    "<b>bold</b> <script>alert(1)</script> $x^2$ **markdown**",
]
REFUSED = {  # message -> a key word of the refusal
    "x" * (MAX_INPUT_CHARS + 1): "too long",
    "bad \ud800 text": "",  # any clear message
    "   ": "empty",
}


class Totals:
    def __init__(self):
        self.lock = threading.Lock()
        self.counts = Counter()
        self.tokens = 0
        self.failures: list[str] = []

    def add(self, kind: str, tokens: int = 0, failure: str | None = None) -> None:
        with self.lock:
            self.counts[kind] += 1
            self.tokens += tokens
            if failure and len(self.failures) < 20:
                self.failures.append(failure)

    def line(self) -> str:
        with self.lock:
            c = self.counts
            return (f"replies {c['complete']}, left mid-stream {c['disconnected']}, refused as expected "
                    f"{c['refused']}, busy {c['busy']}, errors {c['error']}, tokens {self.tokens}")


def reply_tokens(stats: str | None) -> int:
    found = re.search(r"reply (\d+) tokens", stats or "")
    return int(found.group(1)) if found else 0


def client(url: str, number: int, deadline: float, max_tokens: int, totals: Totals) -> None:
    rng = random.Random(number)
    with httpx.Client(base_url=url, timeout=300) as http:
        while time.monotonic() < deadline:
            session = uuid.uuid4().hex  # a new conversation, kept by the server for this session
            for _turn in range(rng.randint(1, 6)):
                if time.monotonic() >= deadline:
                    return
                one_request(http, rng, session, max_tokens, totals)


def one_request(http: httpx.Client, rng: random.Random, session: str, max_tokens: int, totals: Totals) -> None:
    if rng.random() < 0.05:
        message, key = rng.choice(list(REFUSED.items()))
        result = chat_over_http(http, chat_args(message, max_new_tokens=8), session_hash=session)
        if result.event == "error" and result.error and key in result.error.lower():
            totals.add("refused")
        else:
            totals.add("error", failure=f"not refused: {message[:20]!r} -> {result.event} {result.error!r}")
        return
    tokens = rng.randint(8, max_tokens)
    data = chat_args(rng.choice(PROMPTS), system=rng.choice(["", "You are a helpful assistant."]),
                     temperature=rng.choice([0.0, 0.5, 0.8, 1.2]), top_p=rng.choice([0.5, 0.8, 1.0]),
                     max_new_tokens=tokens, top_k=rng.choice([0, 0, 20]),
                     repetition_penalty=rng.choice([1.0, 1.0, 1.1]), seed=rng.choice([-1, rng.randrange(1000)]))
    leave = rng.random() < 0.1
    result = chat_over_http(http, data, session_hash=session, leave_when=(lambda r: len(r.replies) >= 3) if leave else None)
    if result.disconnected:
        totals.add("disconnected")
    elif result.event == "complete":
        totals.add("complete", reply_tokens(result.stats))
    elif "busy" in (result.error or "").lower() or "full" in (result.error or "").lower():
        totals.add("busy")
    else:
        totals.add("error", failure=f"{result.status} {result.event} {result.error!r}")


def server_rss(process: psutil.Process) -> int:
    total = process.memory_info().rss
    for child in process.children(recursive=True):
        try:
            total += child.memory_info().rss
        except psutil.Error:
            pass
    return total


def start_app(folder: Path, port: int, clients: int, workdir: Path) -> tuple[subprocess.Popen, Path]:
    log_path = workdir / "server.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_TEMP_DIR": str(workdir / "gradio-temp")}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "app.py", "--model", str(folder), "--precision", "fp32", "--device", "cpu",
             "--port", str(port), "--max-batch-size", str(max(1, clients)), "--max-queue", str(2 * clients),
             "--max-input-chars", str(MAX_INPUT_CHARS), "--max-new-tokens", "1024"],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}; see {log_path}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                return process, log_path
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise SystemExit(f"the server did not start; see {log_path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="how long the clients run")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--tokens", type=int, default=96, help="longest reply a client asks for")
    parser.add_argument("--every", type=float, default=30.0, help="seconds between progress lines")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="chatglm-soak-"))
    folder = write_checkpoint(workdir / "chatglm3-soak", SPEC, token_bias=NO_STOP, dtype=torch.float32)
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    process, log_path = start_app(folder, port, args.clients, workdir)
    server = psutil.Process(process.pid)
    totals = Totals()
    ok = True
    try:
        with httpx.Client(base_url=url, timeout=300) as http:  # warm-up: the first reply allocates what it needs
            warm = chat_over_http(http, chat_args("Hello", max_new_tokens=args.tokens, seed=1))
            if warm.event != "complete":
                raise SystemExit(f"warm-up request failed: {warm}")
        start_rss = peak_rss = server_rss(server)
        temp_start = dir_bytes(workdir / "gradio-temp")
        print(f"server pid {process.pid}, log {log_path}")
        print(f"{args.clients} clients for {args.minutes:g} minutes, replies up to {args.tokens} tokens")
        print(f"RSS at start: {start_rss / 2**20:8.1f} MiB")

        started = time.monotonic()
        deadline = started + args.minutes * 60
        threads = [threading.Thread(target=client, args=(url, n, deadline, args.tokens, totals), daemon=True)
                   for n in range(args.clients)]
        for thread in threads:
            thread.start()
        next_report = started + args.every
        while any(t.is_alive() for t in threads):
            for thread in threads:
                thread.join(timeout=max(0.0, min(next_report - time.monotonic(), 1.0)))
            if process.poll() is not None:
                print(f"the server exited with {process.returncode}; see {log_path}")
                ok = False
                break
            peak_rss = max(peak_rss, server_rss(server))
            if time.monotonic() >= next_report:
                next_report += args.every
                print(f"{time.monotonic() - started:6.0f} s  RSS {server_rss(server) / 2**20:8.1f} MiB  "
                      f"{totals.line()}", flush=True)
        elapsed = time.monotonic() - started

        if ok:
            end_rss = server_rss(server)
            with httpx.Client(base_url=url, timeout=60) as http:
                alive = chat_over_http(http, chat_args("Still there?", max_new_tokens=4, seed=2)).event == "complete"
            print()
            print(f"RSS at start: {start_rss / 2**20:8.1f} MiB")
            print(f"RSS at end:   {end_rss / 2**20:8.1f} MiB  (growth {(end_rss - start_rss) / 2**20:+.1f} MiB, "
                  f"peak {peak_rss / 2**20:.1f} MiB)")
            print(f"requests in {elapsed:.0f} s: {totals.line()}")
            print(f"tokens/s over the run: {totals.tokens / elapsed:.1f}")
            print(f"Gradio temp folder grew by {dir_bytes(workdir / 'gradio-temp') - temp_start:,} bytes")
            print(f"server answers after the run: {'yes' if alive else 'NO'}")
            ok = alive
        for failure in totals.failures:
            print("unexpected:", failure)
        ok = ok and totals.counts["error"] == 0
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
        shutil.rmtree(folder, ignore_errors=True)  # the checkpoint; the server log stays for a look
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
