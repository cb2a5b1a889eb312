"""Serving benchmark: this app's batching engine vs. raw generate and the one-thread-per-request demo pattern.

    python bench/serving.py [--tokens 64] [--users 1 2 4 8]

Everything runs side by side in one run on one generated GLM-shaped model (original ChatGLM3
format, ~90 M parameters, 65k vocabulary, stop tokens suppressed so every reply is exactly
--tokens long). The app (``app.py``) and the baseline each run as their own server process, as
deployed; this process is the HTTP client and also measures raw generate while both idle:

(a) one user, end to end through the running server's HTTP API (Gradio's /gradio_api/call/chat,
    streamed as server-sent events; gradio_client adds ~150 ms of its own per call, so plain httpx),
    tokens/s divided by raw ``model.generate`` tokens/s on the same prompt and settings;
(b) aggregate tokens/s with 1, 2, 4, 8 concurrent users, for this app and for the usual
    ChatGLM demo pattern (a ``generate`` thread + TextIteratorStreamer per request, under
    Gradio's default queue), and each one's ratio to its own 1-user number;
(c) time to first token seen by an HTTP client of the app, minus the raw prefill time;
(d) Stop: how long after a client leaves a long reply the app's engine runs nothing (its slot is free),
    also in tokens' time at one user's speed (tests assert only that the slot is freed, not how fast).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import torch  # noqa: E402
import httpx  # noqa: E402

from synthetic_checkpoints import TinyChatGLM3, write_checkpoint  # noqa: E402
from server_harness import free_port  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

PROMPT = "Please write a detailed story about a journey across the mountains and the sea."
SPEC = TinyChatGLM3(hidden_size=512, num_layers=8, num_attention_heads=8, kv_channels=64,
                    multi_query_group_num=2, ffn_hidden_size=1536, padded_vocab_size=65024, sp_vocab_size=400)
NO_STOP = {2: -30.0, "<|user|>": -30.0, "<|observation|>": -30.0}


def chat_args(tokens: int, seed: int):
    return (PROMPT, "", 0.8, 0.8, tokens, 0, 1.0, seed, "Chat")


def stream_one(http: httpx.Client, tokens: int, seed: int) -> tuple[float, float]:
    """(seconds to the first streamed text, total seconds) for one /chat call over Gradio's HTTP API."""
    start = time.perf_counter()
    first = None
    event_id = http.post("gradio_api/call/chat", json={"data": list(chat_args(tokens, seed))}).json()["event_id"]
    with http.stream("GET", f"gradio_api/call/chat/{event_id}") as response:
        for line in response.iter_lines():
            if first is None and line.startswith("data:") and len(line) > 12 and "\u23f3" not in line:
                first = time.perf_counter() - start
            if line.startswith("event: complete") or line.startswith("event: error"):
                break
    total = time.perf_counter() - start
    return first or total, total


def engine_idle(http: httpx.Client) -> bool:
    """Whether the app's engine runs no reply and has none waiting (``GET /healthz`` says how many it has)."""
    return "(0 replies running, 0 waiting)" in http.get("healthz").json()["detail"]


def stop_to_free_seconds(url: str, tokens: int = 4000, repeats: int = 3) -> float:
    """Median seconds from a client leaving a long reply (after three streamed updates: Stop, a closed tab) until
    the app's engine runs nothing (``/healthz``): its slot is free for the next user."""
    times = []
    with httpx.Client(base_url=url, timeout=600) as http:
        for seed in range(repeats):
            data = list(chat_args(tokens, seed))
            event_id = http.post("gradio_api/call/chat", json={"data": data}).json()["event_id"]
            with http.stream("GET", f"gradio_api/call/chat/{event_id}") as response:
                updates = 0
                for line in response.iter_lines():
                    updates += line.startswith("data:") and len(line) > 12 and "\u23f3" not in line
                    if updates >= 3:
                        break   # leaving the block closes the connection
            left = time.perf_counter()
            while not engine_idle(http):
                if time.perf_counter() - left > 120:
                    raise RuntimeError("the app's engine still runs a reply 120 s after its client left")
                time.sleep(0.005)
            times.append(time.perf_counter() - left)
    return statistics.median(times)


def aggregate(url: str, users: int, tokens: int) -> float:
    """Total generated tokens / wall time with ``users`` concurrent streamed requests."""
    clients = [httpx.Client(base_url=url, timeout=600) for _ in range(users)]
    for client in clients:
        stream_one(client, 2, 0)
    start = time.perf_counter()
    with ThreadPoolExecutor(users) as pool:
        list(pool.map(lambda i: stream_one(clients[i], tokens, i + 1), range(users)))
    elapsed = time.perf_counter() - start
    for client in clients:
        client.close()
    return users * tokens / elapsed


def raw_generate_rate(model, ids, tokens: int, repeats: int = 3) -> float:
    rates = []
    for seed in range(repeats):
        torch.manual_seed(seed)
        start = time.perf_counter()
        out = model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True, temperature=0.8,
                             top_p=0.8, top_k=0)
        assert out.shape[1] - ids.shape[1] == tokens
        rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def engine_ttft_seconds(loaded, repeats: int = 5) -> float:
    """Time to first token inside the app (LocalBackend + Engine, no HTTP), one-token replies."""
    import asyncio

    from chatglm_web.engine.scheduler import Engine
    from chatglm_web.generation import Finished, SamplingParams
    from chatglm_web.backends.local import LocalBackend

    engine = Engine(loaded.model)
    backend = LocalBackend(engine, loaded.chat_format, loaded.info)

    async def one() -> float:
        async for event in backend.stream_chat([{"role": "user", "content": PROMPT}], SamplingParams(max_new_tokens=1)):
            if isinstance(event, Finished):
                return event.time_to_first_token
        return 0.0

    try:
        return statistics.median(asyncio.run(one()) for _ in range(repeats))
    finally:
        engine.shutdown()


def raw_prefill_seconds(model, ids, repeats: int = 5) -> float:
    times = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            model(ids, logits_to_keep=1)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def start_server(args: list[str], port: int) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                return process
        except httpx.HTTPError:
            time.sleep(0.5)
        if process.poll() is not None:
            raise RuntimeError(f"server {args} exited with {process.returncode}")
    process.kill()
    raise RuntimeError(f"server {args} did not start")


def load_model(folder: Path):
    from chatglm_web.families.loading import load_from_folder
    from chatglm_web.settings import Settings

    return load_from_folder(folder, Settings(precision="fp32", device="cpu"), "bench")


def serve_baseline(folder: Path, port: int) -> None:
    loaded = load_model(folder)
    demo, _ = baseline_server(loaded.model, loaded.chat_format, port)
    demo.block_thread()


def baseline_server(model, tokenizer_format, port: int):
    """The usual ChatGLM web demo: one generate thread per request, Gradio's default queue (concurrency 1)."""
    import gradio as gr
    from transformers import TextIteratorStreamer

    hf_like = _StreamerTokenizer(tokenizer_format.tokenizer)

    def chat(message, history, system_prompt, temperature, top_p, max_new_tokens, top_k, repetition_penalty, seed):
        ids = torch.tensor([tokenizer_format.prompt_ids([{"role": "user", "content": message}])])
        streamer = TextIteratorStreamer(hf_like, skip_prompt=True)
        kwargs = dict(input_ids=ids, max_new_tokens=int(max_new_tokens), min_new_tokens=int(max_new_tokens),
                      do_sample=True, temperature=temperature, top_p=top_p, top_k=0, streamer=streamer)
        threading.Thread(target=model.generate, kwargs=kwargs, daemon=True).start()
        text = ""
        for piece in streamer:
            text += piece
            yield text

    inputs = [gr.Textbox(), gr.Number(), gr.Number(), gr.Number(), gr.Number(), gr.Number(), gr.Number()]
    demo = gr.ChatInterface(chat, additional_inputs=inputs, api_name="chat")
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    return demo, f"http://127.0.0.1:{port}/"


class _StreamerTokenizer:
    """Just what TextIteratorStreamer calls on a tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def decode(self, ids, skip_special_tokens=True, **_):
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=64, help="tokens generated per request")
    parser.add_argument("--users", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--serve-baseline", metavar="FOLDER", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    if args.serve_baseline:
        serve_baseline(Path(args.serve_baseline), args.port)
        return

    folder = write_checkpoint(Path(tempfile.mkdtemp()) / "glm-bench", SPEC, token_bias=NO_STOP, dtype=torch.float32)
    app_port, base_port = free_port(), free_port()
    app = start_server(["app.py", "--model", str(folder), "--precision", "fp32", "--device", "cpu", "--port",
                        str(app_port), "--max-batch-size", str(max(args.users)), "--max-new-tokens", "4096"], app_port)
    base = start_server([__file__, "--serve-baseline", str(folder), "--port", str(base_port)], base_port)
    app_url, base_url = f"http://127.0.0.1:{app_port}/", f"http://127.0.0.1:{base_port}/"
    try:
        loaded = load_model(folder)
        model, chat_format = loaded.model, loaded.chat_format
        params = sum(p.numel() for p in model.parameters())
        ids = torch.tensor([chat_format.prompt_ids([{"role": "user", "content": PROMPT}])])
        print(f"model: GLM-shaped, {params / 1e6:.0f} M parameters, fp32 on CPU; prompt {ids.shape[1]} tokens; "
              f"{args.tokens} tokens per reply; torch threads {torch.get_num_threads()}")

        raw = raw_generate_rate(model, ids, args.tokens)
        prefill = raw_prefill_seconds(model, ids)
        in_app = engine_ttft_seconds(loaded)
        client = httpx.Client(base_url=app_url, timeout=600)
        stream_one(client, 4, 0)
        one = statistics.median(args.tokens / stream_one(client, args.tokens, s)[1] for s in range(3))
        # a one-token reply: the whole request time bounds the time to first token from above
        ttft = statistics.median(stream_one(client, 1, s)[1] for s in range(5))
        stop = stop_to_free_seconds(app_url)
        engine_rates = {u: aggregate(app_url, u, args.tokens) for u in args.users}
        base_rates = {u: aggregate(base_url, u, args.tokens) for u in args.users}
    finally:
        app.terminate()
        base.terminate()

    print()
    print("(a) one user through the HTTP API vs raw model.generate")
    print(f"    raw generate {raw:8.1f} tok/s | app {one:8.1f} tok/s | ratio {one / raw:5.2f}  (target >= 0.95)")
    print("(b) aggregate tokens/s by concurrent users")
    print("    users |  app tok/s  x 1-user | baseline tok/s  x 1-user | app / baseline")
    for u in args.users:
        e, b = engine_rates[u], base_rates[u]
        print(f"    {u:5d} | {e:10.1f} {e / engine_rates[args.users[0]]:7.2f} | {b:14.1f} "
              f"{b / base_rates[args.users[0]]:7.2f} | {e / b:14.2f}")
    print("    target: app at 8 users >= 2.5x its 1-user aggregate")
    print("(c) time to first token")
    print(f"    app one-token reply (HTTP client) {ttft * 1000:7.1f} ms | raw prefill {prefill * 1000:7.1f} ms | "
          f"difference {(ttft - prefill) * 1000:7.1f} ms  (target <= 30 ms)")
    print(f"    inside the app (no HTTP) {in_app * 1000:7.1f} ms | raw prefill {prefill * 1000:7.1f} ms | "
          f"difference {(in_app - prefill) * 1000:7.1f} ms")
    print("(d) Stop: a client leaves a 4000-token reply after three streamed updates")
    print(f"    engine idle {stop * 1000:7.1f} ms later = {stop * one:5.1f} tokens' time at one user's speed "
          f"(the slot is free for the next user; tests assert only that it is freed)")


if __name__ == "__main__":
    main()
