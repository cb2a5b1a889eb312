"""Prometheus metrics for any ``ChatBackend``, measured from the events every request streams.

    backend = MeteredBackend(backend)          # the page and the API both use this one object
    text = backend.metrics.exposition()        # the body of GET /metrics

Requests waiting (``Queued`` seen, no token yet) and running (first token seen, not finished),
requests finished by reason (stop, length, cancelled, error, rejected), generated tokens, and
histograms of time to first token and of time per output token. Each app has its own registry,
so several apps (tests) in one process do not collide.
"""

from __future__ import annotations

import time
from contextlib import aclosing
from typing import AsyncIterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from chatglm_web.generation import (BackendBusy, ChatEvent, Finished, FinishReason, InvalidRequest, Queued,
                                    SamplingParams, TextDelta)

REJECTED = "rejected"  # refused before generating (bad input, busy): a metrics reason beside FinishReason's

disable_created_metrics()  # no *_created series: they only add noise to every scrape

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TPOT_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)


class ServingMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("chatglm_web_requests_running", "Requests generating a reply", registry=r)
        self.waiting = Gauge("chatglm_web_requests_waiting", "Requests waiting for a slot", registry=r)
        self.finished = Counter("chatglm_web_requests_finished", "Requests ended, by reason", ["reason"],
                                registry=r)
        self.prompt_tokens = Counter("chatglm_web_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generated_tokens = Counter("chatglm_web_generated_tokens", "Tokens generated", registry=r)
        self.ttft = Histogram("chatglm_web_time_to_first_token_seconds", "From the request to its first token",
                              buckets=_TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("chatglm_web_time_per_output_token_seconds",
                              "Mean time between output tokens, one observation per request", buckets=_TPOT_BUCKETS, registry=r)
        for reason in [*FinishReason, REJECTED]:
            self.finished.labels(reason)  # present from the start, at 0

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


class MeteredBackend:
    """A ``ChatBackend`` that forwards to another and records what its requests do."""

    def __init__(self, backend, metrics: ServingMetrics | None = None):
        self.backend = backend
        self.metrics = metrics or ServingMetrics()

    def __getattr__(self, name):  # info, engine, health, ... of the wrapped backend
        return getattr(self.backend, name)

    async def stream_chat(self, messages: list[dict], params: SamplingParams) -> AsyncIterator[ChatEvent]:
        m = self.metrics
        started = time.perf_counter()
        state = None  # None -> "waiting" -> "running"

        def move(to):
            nonlocal state
            for name, gauge in (("waiting", m.waiting), ("running", m.running)):
                if state == name:
                    gauge.dec()
                if to == name:
                    gauge.inc()
            state = to

        tokens_before = 0
        try:
            async with aclosing(self.backend.stream_chat(messages, params)) as stream:
                async for event in stream:
                    if isinstance(event, Queued) and state is None:
                        move("waiting")
                    elif isinstance(event, TextDelta) and state != "running":
                        m.ttft.observe(time.perf_counter() - started)
                        move("running")
                    elif isinstance(event, Finished):
                        move(None)
                        m.finished.labels(event.reason).inc()
                        m.prompt_tokens.inc(event.prompt_tokens)
                        m.generated_tokens.inc(event.completion_tokens - tokens_before)
                        if event.completion_tokens > 1 and event.seconds > 0:
                            m.tpot.observe(event.seconds / (event.completion_tokens - 1))
                        tokens_before = event.completion_tokens
                    yield event
        except (InvalidRequest, BackendBusy):
            m.finished.labels(REJECTED).inc()
            raise
        finally:
            if state is not None:  # ended without Finished: the consumer went away
                m.finished.labels(FinishReason.CANCELLED).inc()
                move(None)
