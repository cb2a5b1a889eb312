"""Streaming HTTP clients for the benchmarks: the app's OpenAI-compatible API, the page's Gradio API, vLLM.

Each ``stream(http, messages, tokens, seed)`` sends one request for a reply of ``tokens`` tokens (sampled
at TEMPERATURE / TOP_P with ``seed``; None: unseeded), reads it to its end and returns a ``Stream``:
when it started, when each chunk with content arrived, how many tokens it carried.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

PROMPT = "Please write a detailed story about a journey across the mountains and the sea."
TEMPERATURE, TOP_P = 0.8, 0.8


def user_messages(text: str = PROMPT) -> list[dict]:
    return [{"role": "user", "content": text}]


@dataclass
class Stream:
    """One streamed reply as the client saw it."""

    start: float
    chunks: list[float] = field(default_factory=list)  # arrival time of each chunk with content
    tokens: int = 0
    end: float = 0.0  # the response read to its end

    @property
    def ttft(self) -> float:
        return self.chunks[0] - self.start

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.chunks, self.chunks[1:])]


def read_sse(response, on_data) -> None:
    for line in response.iter_lines():
        if line.startswith("data:") and line.strip() != "data: [DONE]":
            on_data(json.loads(line[5:]))


class AppClient:
    """The app's OpenAI-compatible API (``/v1/chat/completions``, streamed with usage)."""

    name = "app /v1"

    def __init__(self, url: str):
        self.url = url

    def stream(self, http: httpx.Client, messages: list[dict], tokens: int, seed: int) -> Stream:
        body = {"model": "m", "messages": messages, "max_tokens": tokens, "temperature": TEMPERATURE,
                "top_p": TOP_P, "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
        if seed is None:
            del body["seed"]
        stream = Stream(time.perf_counter())

        def on_data(chunk):
            if chunk.get("usage"):
                stream.tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                stream.chunks.append(time.perf_counter())

        with http.stream("POST", self.url + "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            read_sse(response, on_data)
        stream.end = time.perf_counter()
        return stream


class PageClient:
    """The page's Gradio API (``/gradio_api/call/chat``, streamed as server-sent events)."""

    name = "app /chat (Gradio)"

    def __init__(self, url: str):
        self.url = url

    def stream(self, http: httpx.Client, messages: list[dict], tokens: int, seed: int) -> Stream:
        data = [messages[-1]["content"], "", TEMPERATURE, TOP_P, tokens, 0, 1.0, seed, "Chat"]
        stream = Stream(time.perf_counter())
        event_id = http.post(self.url + "/gradio_api/call/chat", json={"data": data}).json()["event_id"]
        event = None
        with http.stream("GET", f"{self.url}/gradio_api/call/chat/{event_id}") as response:
            for line in response.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:") and event == "generating":
                    stream.chunks.append(time.perf_counter())
                elif line.startswith("data:") and event in ("complete", "error"):
                    stats = json.loads(line[5:])[-1] if event == "complete" else line
                    if f"reply {tokens} tokens" not in str(stats):
                        raise RuntimeError(f"the page's reply did not end as expected: {event} {stats!r}")
                    stream.tokens = tokens
                    break
        stream.end = time.perf_counter()
        return stream


class VllmClient:
    """vLLM's ``/v1/completions`` with the prompt as token ids (as the app's remote backend sends it)."""

    name = "vLLM"

    def __init__(self, url: str, model: str, chat_format):
        self.url, self.model, self.format = url, model, chat_format

    def stream(self, http: httpx.Client, messages: list[dict], tokens: int, seed: int) -> Stream:
        body = {"model": self.model, "prompt": self.format.prompt_ids(messages), "max_tokens": tokens,
                "temperature": TEMPERATURE, "top_p": TOP_P, "seed": seed, "stream": True, "detokenize": False,
                "return_token_ids": True}
        if seed is None:
            del body["seed"]
        stream = Stream(time.perf_counter())

        def on_data(chunk):
            ids = chunk["choices"][0].get("token_ids") or [] if chunk.get("choices") else []
            if ids:
                stream.chunks.append(time.perf_counter())
                stream.tokens += len(ids)

        with http.stream("POST", self.url + "/v1/completions", json=body) as response:
            response.raise_for_status()
            read_sse(response, on_data)
        stream.end = time.perf_counter()
        return stream
